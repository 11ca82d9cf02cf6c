"""The per-layer AQ objective ||WX - ŴX||^2 = tr(ΔW H ΔWᵀ), H = XXᵀ/N (docs/quantization.md steps 3–4)."""

from __future__ import annotations

import torch

from ..nn import decode_weight


def row_errors(weight: torch.Tensor, hessian: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor,
               scales: torch.Tensor) -> torch.Tensor:
    """Per-output-row error ΔW_r H ΔW_rᵀ, summed in float64 (for checks and stopping).

    The product ΔW·H runs in fp32 (a float64 matmul cost as much as the rest of a fast-preset round): its relative
    rounding, ≈ 1e-6, is four orders below the 1% stopping tolerance; the row sums accumulate in float64."""
    codebooks = codebooks.reshape(codebooks.shape[0], codebooks.shape[1], 1, -1)
    residual = weight - decode_weight(codes, codebooks, scales.reshape(-1, 1, 1, 1))
    return ((residual @ hessian).double() * residual.double()).sum(-1)


def layer_loss(weight, hessian, codes, codebooks, scales) -> float:
    """Mean over output rows of ΔW_r H ΔW_rᵀ (the reference's loss)."""
    return row_errors(weight, hessian, codes, codebooks, scales).mean().item()


def relative_error(weight, hessian, codes, codebooks, scales) -> float:
    """Layer output error relative to the layer output energy: tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)."""
    total = ((weight @ hessian).double() * weight.double()).sum().item()
    return row_errors(weight, hessian, codes, codebooks, scales).sum().item() / max(total, 1e-30)
