"""The `aqlm` op dialect: the torch ops that carry AQLM layers through `torch.export` (core: the exporter emits
them, the passes rewrite them, the ONNX and Relax routes consume them).

- `aqlm::dequantize(codes, codebooks, scales) -> W [out, in] fp32`: what an `AqlmLinear` emits when exported (a
  Q/DQ-style pattern: dequantize, then an ordinary `aten.linear`). Nothing is lost: every tensor of the layer stays
  a separate graph input, in the HF AQLM layout.
- `aqlm::aqlm_gemm(x, codes, codebooks, scales, bias?) -> y`: one node per AQLM layer, what `lower_aqlm_linear`
  rewrites the pattern into and what the ONNX (`aqlm.AqlmMatMul`) and Relax (`call_tir` of kernels/) routes
  consume. The config is visible from the input shapes: M = codes.shape[2], K = codebooks.shape[1],
  g = codebooks.shape[3] (`AqlmConfig.from_shapes`). (Named `aqlm_gemm`, not `linear`: converter maps key ops by
  name only, and `linear.default` would collide with aten's — docs/tvm-and-ort-notes.md N14.)

- `aqlm::linear_rows_int8(x, W8, s)` and `aqlm::linear_f16(x, W16)`: a dense layer (the lm_head) in the form the
  artifact stores it (int8 rows with per-row scales; fp16), one node each (ONNX: `aqlm.DenseMatMul`).
- `aqlm::gqa_attention(q, k, v, past_k, past_v, mask, cos, sin, ...) -> (out, present_k, present_v)`: a decoder
  layer's rotary + KV-cache append + causal grouped-query attention, one node (ONNX: ORT's
  `com.microsoft.GroupQueryAttention`; export.attention_ops_for_onnx).

All have a reference implementation (the same decode as `AqlmLinear`) and a fake one, so they export as single
nodes and run eagerly for the before/after tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import AqlmConfig
from .nn import decode_weight


def _decode(codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    nbits = AqlmConfig.from_shapes(codes.shape, codebooks.shape).nbits_per_codebook
    unsigned = codes.to(torch.int64) % (1 << nbits)
    return decode_weight(unsigned, codebooks.float(), scales.float())


@torch.library.custom_op("aqlm::dequantize", mutates_args=())
def dequantize(codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return _decode(codes, codebooks, scales)


@dequantize.register_fake
def _(codes, codebooks, scales):
    return codes.new_empty((codes.shape[0], codes.shape[1] * codebooks.shape[-1]), dtype=torch.float32)


@torch.library.custom_op("aqlm::aqlm_gemm", mutates_args=())
def aqlm_gemm(x: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor,
              bias: torch.Tensor | None = None, partitions: list[int] | None = None) -> torch.Tensor:
    """`partitions` (a fused layer, see fuse_shared_input): rows [sum(p[:i]), sum(p[:i+1])) decode with codebooks
    i·M .. i·M+M-1 of `codebooks` [P·M, K, 1, g]."""
    if partitions:
        m = codes.shape[2]
        rows = torch.split(codes, list(partitions)), torch.split(scales, list(partitions))
        w = torch.cat([_decode(c, codebooks[i * m:(i + 1) * m], s) for i, (c, s) in enumerate(zip(*rows))])
    else:
        w = _decode(codes, codebooks, scales)
    return F.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))


@aqlm_gemm.register_fake
def _(x, codes, codebooks, scales, bias=None, partitions=None):
    return x.new_empty((*x.shape[:-1], codes.shape[0]))


@torch.library.custom_op("aqlm::linear_rows_int8", mutates_args=())
def linear_rows_int8(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """y = (x · W8ᵀ) · s: a dense layer stored as int8 rows with one fp32 scale per row (export.keep_head_int8)."""
    return F.linear(x, weight.to(x.dtype)) * scales.to(x.dtype)


@linear_rows_int8.register_fake
def _(x, weight, scales):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.custom_op("aqlm::linear_f16", mutates_args=())
def linear_f16(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """y = x · W16ᵀ in fp32: a dense layer kept fp16 as stored (the ONNX route's lm_head, export.dense_ops_for_onnx). One
    node, so ONNX Runtime cannot constant-fold a Cast of the weight into an fp32 copy of it."""
    return F.linear(x, weight.to(x.dtype))


@linear_f16.register_fake
def _(x, weight):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x [B, h, S, D] with the half-split layout (HF `rotate_half`); cos/sin [S, D/2]."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


@torch.library.custom_op("aqlm::gqa_attention", mutates_args=())
def gqa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor,
                  attention_mask: torch.Tensor, cos_cache: torch.Tensor, sin_cache: torch.Tensor, num_heads: int,
                  kv_num_heads: int, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Causal grouped-query attention of S new tokens after P cached ones, as ORT's GroupQueryAttention computes it
    (do_rotary, half-split rotary): q [B, S, H·D], k/v [B, S, H_kv·D] before rotary; past_k/v [B, H_kv, P, D];
    positions P..P+S-1 read rows of cos_cache/sin_cache [max_positions, D/2]; `attention_mask` [B, P+S] must be all
    ones (no padding: batch 1, what every runtime of an artifact passes). Returns (out [B, S, H·D], present_k,
    present_v [B, H_kv, P+S, D])."""
    b, s, _ = q.shape
    p, d = past_k.shape[2], past_k.shape[3]
    if p + s > cos_cache.shape[0]:
        raise ValueError(f"gqa_attention: {p + s} positions, the rotary table has {cos_cache.shape[0]}")
    cos, sin = cos_cache[p:p + s].to(q.dtype), sin_cache[p:p + s].to(q.dtype)
    qh = _rotate(q.view(b, s, num_heads, d).transpose(1, 2), cos, sin)
    kh = _rotate(k.view(b, s, kv_num_heads, d).transpose(1, 2), cos, sin)
    vh = v.view(b, s, kv_num_heads, d).transpose(1, 2)
    keys, values = torch.cat((past_k, kh), dim=2), torch.cat((past_v, vh), dim=2)
    rep = num_heads // kv_num_heads
    scores = qh @ keys.repeat_interleave(rep, dim=1).transpose(-1, -2) * scale
    query_pos = torch.arange(p, p + s).view(-1, 1)
    key_pos = torch.arange(p + s).view(1, -1)
    weights = torch.softmax(scores.masked_fill(key_pos > query_pos, float("-inf")), dim=-1)
    out = (weights @ values.repeat_interleave(rep, dim=1)).transpose(1, 2).reshape(b, s, num_heads * d)
    return out, keys, values


@gqa_attention.register_fake
def _(q, k, v, past_k, past_v, attention_mask, cos_cache, sin_cache, num_heads, kv_num_heads, scale):
    b, s, _ = q.shape
    total = past_k.shape[2] + s
    kv_shape = (b, past_k.shape[1], total, past_k.shape[3])
    return q.new_empty((b, s, num_heads * past_k.shape[3])), past_k.new_empty(kv_shape), past_v.new_empty(kv_shape)


def export_forward(layer, x: torch.Tensor) -> torch.Tensor:
    """`AqlmLinear.forward` as it is traced for export: dequantize (one op) + aten.linear."""
    w = torch.ops.aqlm.dequantize(layer.codes, layer.codebooks, layer.scales)
    return F.linear(x, w.to(x.dtype), None if layer.bias is None else layer.bias.to(x.dtype))


@dataclass(frozen=True)
class GemmLayer:
    """What one `aqlm.aqlm_gemm` node of an exported graph computes (`gemm_layer`)."""

    out_features: int
    in_features: int
    config: AqlmConfig
    partitions: tuple[int, ...] | None  # a fused layer's row partitions (passes/fuse_shared_input.py)
    has_bias: bool


def gemm_layer(node) -> GemmLayer:
    """Read an `aqlm.aqlm_gemm` FX node (from its inputs' fake values): the one reader of the op's arguments for the
    build plan's kernel requests and the Relax route."""
    codes, codebooks = node.args[1].meta["val"], node.args[2].meta["val"]
    bias = node.args[4] if len(node.args) > 4 else node.kwargs.get("bias")
    parts = node.kwargs.get("partitions") or (node.args[5] if len(node.args) > 5 else None)
    config = AqlmConfig.from_shapes(tuple(codes.shape), tuple(codebooks.shape))
    return GemmLayer(int(codes.shape[0]), int(codes.shape[1]) * config.in_group_size, config,
                     tuple(int(p) for p in parts) if parts else None, bias is not None)
