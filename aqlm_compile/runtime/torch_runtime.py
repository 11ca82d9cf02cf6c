"""The PyTorch decoder (reference): the checkpoint's AqlmLinear model with the same explicit KV cache as the
exported graphs, so `generate --runtime torch` and `--runtime ort|tvm` run the same computation."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import artifact


def checkpoint_of(path: Path) -> Path:
    """An artifact folder's checkpoint (weights/) or a checkpoint folder itself."""
    path = Path(path)
    if (path / artifact.MANIFEST).is_file():
        artifact.verify(path, expect_arch=artifact.read_manifest(path)["arch"])  # sha256 only: torch runs anywhere
        return path / "weights"
    return path


class TorchDecoder:
    def __init__(self, path: str | Path, dense_model_dir: str | Path | None = None, threads: int | None = None):
        import torch

        from .. import format as fmt
        from ..decoder import DecoderWithCache

        if threads:
            torch.set_num_threads(threads)
        if dense_model_dir is not None:
            from ..models import load_fp_model

            model, _ = load_fp_model(Path(dense_model_dir))
        else:
            model, _, _ = fmt.load(checkpoint_of(Path(path)))
            if (Path(path) / artifact.MANIFEST).is_file():
                from ..embedding import compact_embedding, round_head

                # the embedding and a dense head as the artifact's routes read them (`build --embedding --head`)
                manifest = artifact.read_manifest(Path(path))
                compact_embedding(model, manifest.get("embedding", "stored"))
                round_head(model, artifact.head_form(manifest))  # after: a compact embedding keeps its own rows
        model.config.use_cache = True
        self.torch = torch
        self.wrapper = DecoderWithCache(model).eval()
        spec = self.wrapper.spec
        self.num_layers, self.num_kv_heads, self.head_dim = spec.num_layers, spec.num_kv_heads, spec.head_dim
        self.vocab_size, self.bos_token_id, self.eos_token_ids = spec.vocab_size, spec.bos_token_id, spec.eos_token_ids
        self.reset()

    def reset(self) -> None:
        empty = self.torch.zeros(1, self.num_kv_heads, 0, self.head_dim)
        self.past = [empty] * (2 * self.num_layers)
        self.length = 0

    def step(self, ids: np.ndarray) -> np.ndarray:
        torch = self.torch
        ids_t = torch.from_numpy(np.asarray(ids, dtype=np.int64).reshape(1, -1))
        mask = torch.ones(1, self.length + ids_t.shape[1], dtype=torch.int64)
        with torch.no_grad():
            out = self.wrapper(ids_t, mask, *self.past)
        self.past = list(out[1:])
        self.length += ids_t.shape[1]
        return out[0][0].float().numpy()
