"""The input embedding in a compact form (`build --embedding`, issue 14 item 2), and int8 rows: core, so that the
build (export.py), `eval` and the PyTorch reference runtime (runtime/torch_runtime.py) all compute the same rows."""

from __future__ import annotations

import types

import torch

from .nn import AqlmLinear, unpack_codes


def rows_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: (W8 int8 [O, I], s fp32 [O]) with W ≈ W8 · s (a zero row keeps scale 1)."""
    w = weight.detach().float()
    scale = w.abs().amax(1) / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


def _embedding_rows_int8(self, ids):
    rows = torch.nn.functional.embedding(ids, self.weight8).float()
    return rows * torch.nn.functional.embedding(ids, self.row_scales.unsqueeze(1))


EMBEDDINGS = ("stored", "int8", "head")


def compact_embedding(model, kind: str) -> None:
    """The input embedding in a compact form, in place (the `build --embedding` option; issue 14 item 2). Only one
    row is read per token, so any form costs nothing at decode; what it saves is the artifact's bytes.

    - "stored": unchanged (fp16 as the checkpoint stores it; tied to a dense head, `--head` decides).
    - "int8": int8 rows with one fp32 scale per row (`rows_int8`): half of fp16.
    - "head": rows decoded from the quantized lm_head's AQLM codes — for a model whose embedding was the head's
      weight before `quantize --head-config` untied them (config.json `aqlm_compile.head_untied`); the embedding
      then costs no bytes at all. Row r = scales[r] · Σ_m codebooks[m, codes[r, :, m]], the head's own decode.

    Works in eager mode (the PyTorch model the artifact is compared with) and under torch.export."""
    if kind not in EMBEDDINGS:
        raise ValueError(f"embedding {kind!r}: expected one of {', '.join(EMBEDDINGS)}")
    if kind == "stored":
        return
    emb = model.get_input_embeddings()
    if not isinstance(emb, torch.nn.Embedding):
        raise ValueError(f"--embedding {kind}: the input embedding is a {type(emb).__name__}, not nn.Embedding")
    if kind == "int8":
        w8, s = rows_int8(emb.weight)
        emb.weight8 = torch.nn.Parameter(w8, requires_grad=False)
        emb.row_scales = torch.nn.Parameter(s, requires_grad=False)
        del emb.weight
        emb.forward = types.MethodType(_embedding_rows_int8, emb)
        return
    head = model.get_output_embeddings()
    if not isinstance(head, AqlmLinear) or (head.out_features, head.in_features) != tuple(emb.weight.shape):
        raise ValueError("--embedding head: the lm_head is not an AQLM layer of the embedding's shape "
                         "(quantize with --head-config)")
    del emb.weight
    object.__setattr__(emb, "head", head)  # a reference, not a submodule: the head's tensors stay one copy
    emb.forward = types.MethodType(_embedding_from_head, emb)


def _embedding_from_head(self, ids):
    head = self.head
    m, k = head.config.num_codebooks, head.config.codebook_size
    flat = ids.reshape(-1)
    # index_select on the parameters as they are (no reshape first): exported as a Gather on the head's own
    # initializers, never a folded copy of them
    codes = unpack_codes(torch.index_select(head.codes, 0, flat), head.config.nbits_per_codebook)  # [T, J, M]
    codes = codes + torch.arange(m, device=codes.device) * k
    books = head.codebooks.reshape(m * k, -1).float()  # [M·K, g] (fp32: summed as the kernels sum)
    rows = books[codes].sum(-2).flatten(-2)  # [T, J·g]
    scales = torch.index_select(head.scales, 0, flat).float().reshape(-1, 1)
    return (rows * scales).reshape(*ids.shape, -1)
