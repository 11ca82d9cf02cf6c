"""The TVM runtime decoder of an artifact folder: the compiled whole-model library run by the Relax VirtualMachine
with the TVM runtime only (`TVM_USE_RUNTIME_LIB=1`: the compiler library is never loaded; no torch needed).
`prefill` runs the prompt (any token count), `decode` each following token."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

from .. import artifact
from ..errors import FormatError


def whole_model(decoder, artifact_dir, kind: str, expect_arch: str | None = None) -> dict:
    """Verify the artifact, set `decoder.dir/manifest` and the decoder spec (layers, KV heads, head size, vocabulary,
    BOS/EOS) on `decoder`, and return the manifest entry of the whole-model TVM route (`kind` aqlm or dense)."""
    decoder.dir = Path(artifact_dir)
    decoder.manifest = artifact.verify(decoder.dir, expect_arch=expect_arch)
    info = decoder.manifest.get("tvm")
    if not info:
        raise FormatError(f"{decoder.dir / artifact.MANIFEST}: tvm: missing (artifact built without the whole-model "
                          "TVM route)")
    if kind in ("dense", "dense_fp16"):
        if kind not in info:
            raise FormatError(f"{decoder.dir / artifact.MANIFEST}: tvm.{kind}: missing (build with --dense"
                              f"{' --dense-dtype fp16' if kind == 'dense_fp16' else ''})")
        info = info[kind]
    spec = info["decoder"]
    decoder.num_layers, decoder.num_kv_heads = spec["num_layers"], spec["num_kv_heads"]
    decoder.head_dim = spec["head_dim"]
    decoder.vocab_size, decoder.bos_token_id = spec["vocab_size"], spec["bos_token_id"]
    decoder.eos_token_ids = tuple(spec["eos_token_ids"])
    return info


class TvmDecoder:
    def __init__(self, artifact_dir: str | Path, threads: int | None = None, kind: str = "aqlm"):
        manifest = artifact.read_manifest(Path(artifact_dir))
        # the device the build plan compiled the whole model for (tvm.device; absent: the CPU). On a GPU the arch
        # is the SM list and the host code is this machine's, so only the sha256 are checked here.
        on_gpu = (manifest.get("tvm") or {}).get("device", "cpu") == "cuda"
        info = whole_model(self, artifact_dir, kind, expect_arch=manifest["arch"] if on_gpu else None)
        os.environ.setdefault("TVM_NUM_THREADS", str(threads or os.cpu_count() or 1))
        if "tvm" not in sys.modules and not on_gpu:
            # runtime only: the compiler library is not loaded. Not for cuda artifacts: with this variable TVM never
            # loads its CUDA runtime library, and the CUDA module loader is missing.
            os.environ.setdefault("TVM_USE_RUNTIME_LIB", "1")
        import tvm
        from tvm.runtime.vm import VirtualMachine

        self.tvm = tvm
        self.dev = tvm.cuda(0) if on_gpu else tvm.cpu()
        if on_gpu and not self.dev.exist:
            raise FormatError(f"{self.dir}: a cuda artifact needs an NVIDIA GPU and its driver; none found here")
        self.vm = VirtualMachine(tvm.runtime.load_module(str(self.dir / info["library"])), self.dev)
        loaded = tvm.runtime.load_param_dict_from_file(str(self.dir / info["params"]))
        self.params = [loaded[k] for k in sorted(loaded)]
        if len(self.params) != info["num_params"]:
            raise FormatError(f"{self.dir / info['params']}: {len(self.params)} tensors, manifest says "
                              f"{info['num_params']}")
        self.reset()

    def reset(self) -> None:
        empty = self.tvm.runtime.tensor(np.zeros((1, self.num_kv_heads, 0, self.head_dim), np.float32), self.dev)
        self.past = [empty] * (2 * self.num_layers)
        self.length = 0

    def step(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64).reshape(1, -1)
        fn = self.vm["decode"] if ids.shape[1] == 1 and self.length > 0 else self.vm["prefill"]
        t = self.tvm.runtime.tensor
        mask = np.ones((1, self.length + ids.shape[1]), np.int64)
        out = fn(t(ids, self.dev), t(mask, self.dev), *self.past, *self.params)
        self.past = [out[i] for i in range(1, 1 + 2 * self.num_layers)]
        self.length += ids.shape[1]
        return out[0].numpy()[0]
