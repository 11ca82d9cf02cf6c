"""`AqlmLinear`: the reference forward of an AQLM layer; the only place that decodes weights in torch."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import AqlmConfig

_CODE_DTYPES = {"int8": torch.int8, "int16": torch.int16}


def code_dtype(config: AqlmConfig) -> torch.dtype:
    return _CODE_DTYPES[config.code_dtype_name]


def pack_codes(codes: torch.Tensor, nbits: int) -> torch.Tensor:
    """Unsigned codes 0..2^B-1 -> the signed storage of the HF format (values >= 2^(B-1) have 2^B subtracted)."""
    codes = codes.to(torch.int64)
    signed = torch.where(codes >= (1 << (nbits - 1)), codes - (1 << nbits), codes)
    return signed.to(torch.int8 if nbits <= 8 else torch.int16)


def unpack_codes(codes: torch.Tensor, nbits: int) -> torch.Tensor:
    """Stored codes (any int dtype) -> int64 codes in 0..2^B-1 (x mod 2^B, as every reader does)."""
    return codes.to(torch.int64) % (1 << nbits)


class _DecodeGroups(torch.autograd.Function):
    """sum_m codebooks[m, codes[..., m]] with a scatter-add backward (faster on CPU than embedding_bag's)."""

    @staticmethod
    def forward(ctx, codes, codebooks):  # codes int64 [N, M]; codebooks [M, K, g] -> [N, g]
        ctx.save_for_backward(codes)
        ctx.codebook_shape = codebooks.shape
        out = codebooks[0][codes[:, 0]]
        for m in range(1, codebooks.shape[0]):
            out += codebooks[m][codes[:, m]]
        return out

    @staticmethod
    def backward(ctx, grad):
        (codes,) = ctx.saved_tensors
        grad_cb = grad.new_zeros(ctx.codebook_shape)
        for m in range(codes.shape[1]):
            grad_cb[m].index_add_(0, codes[:, m], grad)
        return None, grad_cb


def decode_weight(codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """W[o, j*g:(j+1)*g] = scales[o] * sum_m codebooks[m, codes[o, j, m]] (differentiable in codebooks, scales).

    codes: int64 [out, in/g, M] in 0..K-1; codebooks: [M, K, 1, g]; scales: [out, 1, 1, 1].
    """
    num_codebooks, codebook_size, _, group = codebooks.shape
    out_features, num_groups, _ = codes.shape
    flat_codes = codes.reshape(-1, num_codebooks)
    flat_books = codebooks.reshape(num_codebooks, codebook_size, group)
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        groups = sum(flat_books[m][flat_codes[:, m]] for m in range(num_codebooks))
    else:
        groups = _DecodeGroups.apply(flat_codes, flat_books)
    return groups.view(out_features, num_groups * group) * scales.view(out_features, 1)


class AqlmLinear(nn.Module):
    """y = x @ decode(codes, codebooks, scales)^T + bias, with tensors named and shaped as in the HF AQLM format."""

    def __init__(self, in_features: int, out_features: int, config: AqlmConfig, bias: bool = False,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        config.check_shape(out_features, in_features)
        self.in_features, self.out_features, self.config = in_features, out_features, config
        m, k, g = config.num_codebooks, config.codebook_size, config.in_group_size
        self.codes = nn.Parameter(
            torch.zeros(out_features, in_features // g, m, dtype=code_dtype(config), device=device), requires_grad=False
        )
        self.codebooks = nn.Parameter(torch.zeros(m, k, 1, g, dtype=dtype, device=device))
        self.scales = nn.Parameter(torch.ones(out_features, 1, 1, 1, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_parts(cls, codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor, config: AqlmConfig,
                   bias: torch.Tensor | None = None) -> "AqlmLinear":
        """Build from unsigned int64 codes [out, in/g, M], codebooks [M, K, 1, g] or [M, K, g], scales [out] or [out,1,1,1]."""
        out_features, num_groups, _ = codes.shape
        layer = cls(num_groups * config.in_group_size, out_features, config, bias=bias is not None,
                    dtype=codebooks.dtype, device=codebooks.device)
        with torch.no_grad():
            layer.codes.copy_(pack_codes(codes, config.nbits_per_codebook))
            layer.codebooks.copy_(codebooks.reshape(layer.codebooks.shape))
            layer.scales.copy_(scales.reshape(layer.scales.shape))
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    def unpacked_codes(self) -> torch.Tensor:
        return unpack_codes(self.codes, self.config.nbits_per_codebook)

    def weight(self) -> torch.Tensor:
        return decode_weight(self.unpacked_codes(), self.codebooks, self.scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight().to(x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, config={self.config.name}"
