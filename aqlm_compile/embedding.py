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


# int4 rows: groups of this many weights share one fp16 scale (llama.cpp's Q4_0 block); a row whose width it does
# not divide gets one scale for the whole row
INT4_GROUP = 32


def rows_int4(weight: torch.Tensor, group: int = INT4_GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric 4-bit rows in groups: (packed uint8 [O, I/2], scales fp16 [O, I/group']) with
    W[o, i] ≈ (q − 8) · s[o, i // group'], q in 0..15 (−7..7 used around 8); element 2k is the low nibble of byte k,
    2k+1 the high one. group' = group when it divides I (and I is even), else I."""
    w = weight.detach().float()
    rows, cols = w.shape
    if cols % 2:
        raise ValueError(f"int4 rows: the row width {cols} is odd (two values share a byte)")
    g = group if cols % group == 0 else cols
    scale = (w.reshape(rows, cols // g, g).abs().amax(-1) / 7).half().float()  # the fp16 scale the table stores
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w.reshape(rows, cols // g, g) / scale[..., None]).clamp(-7, 7).to(torch.int32) + 8
    q = q.reshape(rows, cols // 2, 2)
    return (q[..., 0] + 16 * q[..., 1]).to(torch.uint8), scale.half()


def unpack_rows_int4(packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """fp32 rows [T, I] from `rows_int4`'s packed bytes and scales of T rows (arithmetic only, no bit ops: both
    export routes take integer division)."""
    b = packed.to(torch.int32)
    hi = torch.div(b, 16, rounding_mode="floor")
    q = torch.stack([b - 16 * hi, hi], -1).reshape(packed.shape[0], -1).float() - 8.0
    groups = scales.shape[-1]
    return (q.reshape(packed.shape[0], groups, -1) * scales.float().unsqueeze(-1)).reshape(packed.shape[0], -1)


def _embedding_rows_int4(self, ids):
    flat = ids.reshape(-1)
    rows = unpack_rows_int4(torch.index_select(self.weight4, 0, flat), torch.index_select(self.row_scales, 0, flat))
    return rows.reshape(*ids.shape, -1)


EMBEDDINGS = ("stored", "int8", "int4", "head")


def compact_embedding(model, kind: str) -> None:
    """The input embedding in a compact form, in place (the `build --embedding` option; issue 14 item 2). Only one
    row is read per token, so any form costs nothing at decode; what it saves is the artifact's bytes.

    - "stored": unchanged (fp16 as the checkpoint stores it; tied to a dense head, `--head` decides).
    - "int8": int8 rows with one fp32 scale per row (`rows_int8`): half of fp16.
    - "int4": 4-bit rows, two per byte, one fp16 scale per 32 weights (`rows_int4`): 0.28× fp16.
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
    if kind in ("int8", "int4"):
        # (table attribute, quantizer, forward): the table's name says its storage ("weight8" / "weight4")
        table, quantize, forward = {"int8": ("weight8", rows_int8, _embedding_rows_int8),
                                    "int4": ("weight4", rows_int4, _embedding_rows_int4)}[kind]
        rows, scales = quantize(emb.weight)
        setattr(emb, table, torch.nn.Parameter(rows, requires_grad=False))
        emb.row_scales = torch.nn.Parameter(scales, requires_grad=False)
        del emb.weight
        emb.forward = types.MethodType(forward, emb)
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


HEADS = ("fp16", "int8")
# `build`, `eval` and `quantize --bits` store a dense lm_head (and an embedding tied to it) as int8 rows unless told
# otherwise: half its bytes per token for +0.24% held-out PPL on SmolLM2-135M 2x8g8 and +0.18% on 4x8g8
# (benchmarks/head_int8_ppl.py; issue 13's bar for a default is 1%: docs/quantization.md step 6b)
DEFAULT_HEAD = "int8"


def default_head(model, recorded: str | None = None, device: str = "cpu") -> str:
    """The dense lm_head's form when `--head` is not given: the form a `quantize --bits` checkpoint recorded
    (config.json aqlm_compile.dense_head) or DEFAULT_HEAD — where the head is a dense linear and the target a CPU
    (kernels/dense.py's int8 kernel is CPU-scheduled); otherwise "fp16", which leaves any head as stored (an AQLM
    head, a CUDA build)."""
    if device != "cpu" or type(model.get_output_embeddings()) is not torch.nn.Linear:
        return "fp16"
    return recorded if recorded in HEADS else DEFAULT_HEAD


def round_head(model, kind: str) -> None:
    """The dense lm_head's weight as `build --head KIND` computes with, in place: "fp16" leaves it; "int8" replaces
    it by its int8 rows times their per-row scales (`rows_int8`, the values `export.keep_head_int8` stores). A tied
    embedding still in its stored form reads the same rows, as in the artifact; apply after `compact_embedding`, so
    a compact embedding keeps the table it was made from."""
    if kind not in HEADS:
        raise ValueError(f"head {kind!r}: expected one of {', '.join(HEADS)}")
    if kind == "fp16":
        return
    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear:
        raise ValueError(f"--head {kind}: the lm_head is a {type(head).__name__}, not a dense linear (an AQLM head is "
                         "already compact)")
    rows, scales = rows_int8(head.weight)
    with torch.no_grad():
        head.weight.copy_((rows.float() * scales[:, None]).to(head.weight.dtype))


def head_bits(kind: str, rows: int, cols: int) -> int:
    """Exact storage bits of a dense [rows, cols] lm_head in form `kind` (see `round_head`)."""
    if kind not in HEADS:
        raise ValueError(f"head {kind!r}: expected one of {', '.join(HEADS)}")
    return 16 * rows * cols if kind == "fp16" else 8 * rows * cols + 32 * rows


def embedding_bits(kind: str, rows: int, cols: int) -> int:
    """Exact storage bits of a [rows, cols] input embedding in form `kind` (see `compact_embedding`): what
    `quantize --bits` counts for it. "head" costs nothing: its rows are the quantized lm_head's."""
    if kind not in EMBEDDINGS:
        raise ValueError(f"embedding {kind!r}: expected one of {', '.join(EMBEDDINGS)}")
    if kind == "stored":
        return 16 * rows * cols
    if kind == "int8":
        return 8 * rows * cols + 32 * rows
    if kind == "int4":
        g = INT4_GROUP if cols % INT4_GROUP == 0 else cols
        return 4 * rows * cols + 16 * rows * (cols // g)
    return 0
