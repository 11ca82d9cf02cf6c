"""Codebook and scale update with codes fixed (docs/quantization.md step 4): Adam on tr(ΔW H ΔWᵀ)/out.

The gradient of the quadratic loss w.r.t. Ŵ is 2·ΔW·H/out, so each step costs one [out, in]×[in, in] matmul
(autograd would spend two). The loss is divided by mean(diag H) so Adam's epsilon means the same for every layer.
"""

from __future__ import annotations

import torch

from ..nn import decode_weight


def update_codebooks(weight: torch.Tensor, hessian: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor,
                     scales: torch.Tensor, steps: int, lr: float, betas=(0.0, 0.95), amsgrad: bool = True):
    """Returns updated (codebooks [M, K, 1, g], scales [out, 1, 1, 1])."""
    out_features = weight.shape[0]
    cb = codebooks.detach().clone().requires_grad_(True)
    sc = scales.detach().clone().requires_grad_(True)
    if steps <= 0:
        return cb.detach(), sc.detach()
    norm = hessian.diagonal().mean().clamp_min(1e-30)
    h = hessian / norm
    opt = torch.optim.Adam([cb, sc], lr=lr, betas=betas, amsgrad=amsgrad)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        w_hat = decode_weight(codes, cb, sc)
        with torch.no_grad():
            grad = (w_hat - weight) @ h
            grad.mul_(2.0 / out_features)
        w_hat.backward(grad)
        opt.step()
    return cb.detach(), sc.detach()


def decode_adjoint(codes: torch.Tensor, grad_weight: torch.Tensor, scales: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """Adjoint of `decode_weight` w.r.t. the codebooks: [out, in] -> [M, K, 1, g]."""
    out_features, num_groups, num_codebooks = codes.shape
    group = grad_weight.shape[1] // num_groups
    scaled = (grad_weight * scales.reshape(-1, 1)).reshape(-1, group)
    flat_codes = codes.reshape(-1, num_codebooks)
    result = grad_weight.new_zeros(num_codebooks, codebook_size, group)
    for m in range(num_codebooks):
        result[m].index_add_(0, flat_codes[:, m], scaled)
    return result.unsqueeze(2)


def solve_codebooks(weight: torch.Tensor, hessian: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor,
                    scales: torch.Tensor, iters: int) -> torch.Tensor:
    """Least-squares codebooks for fixed codes and scales by Jacobi-preconditioned conjugate gradients.

    Ŵ is linear in the codebooks (Ŵ = D(C)), so min_C tr((D(C) − W) H (D(C) − W)ᵀ) solves Dᵀ(D(C)·H) = Dᵀ(W·H).
    Each iteration costs one [out, in]×[in, in] matmul, like an Adam step, but converges far faster when H has
    outlier channels (the preconditioner absorbs their scale).
    """
    if iters <= 0:
        return codebooks
    k = codebooks.shape[1]
    ones = torch.ones_like(scales)

    def apply_a(c):
        return decode_adjoint(codes, decode_weight(codes, c, scales) @ hessian, scales, k)

    diag_h = hessian.diagonal().reshape(1, -1).expand(weight.shape[0], -1) * scales.reshape(-1, 1)
    precond = decode_adjoint(codes, diag_h, ones, k)
    precond = torch.where(precond > 0, precond, torch.ones_like(precond))
    x = codebooks.detach().clone()
    r = decode_adjoint(codes, weight @ hessian, scales, k) - apply_a(x)
    z = r / precond
    p = z.clone()
    rz = (r * z).sum()
    rz0 = rz.abs().clamp_min(1e-30)
    for _ in range(iters):
        ap = apply_a(p)
        denom = (p * ap).sum()
        if denom <= 0:
            break
        alpha = rz / denom
        x += alpha * p
        r -= alpha * ap
        z = r / precond
        rz_new = (r * z).sum()
        if rz_new <= 1e-7 * rz0:  # converged to what fp32 resolves; further steps only add rounding noise
            break
        p = z + (rz_new / rz) * p
        rz = rz_new

    def loss(c):
        residual = decode_weight(codes, c, scales) - weight
        return ((residual @ hessian) * residual).sum()

    # fp32 CG can lose conjugacy on ill-conditioned problems: never return something worse than the start.
    return x if loss(x) <= loss(codebooks) else codebooks.detach().clone()


def solve_scales(weight: torch.Tensor, hessian: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """Per-row least-squares scales for fixed codes and codebooks: s_r = <W_r, V_r>_H / <V_r, V_r>_H."""
    unscaled = decode_weight(codes, codebooks, torch.ones(weight.shape[0], 1, 1, 1, dtype=weight.dtype, device=weight.device))
    vh = unscaled @ hessian
    num = (weight * vh).sum(-1)
    den = (unscaled * vh).sum(-1)
    scales = torch.where(den > 0, num / den.clamp_min(1e-30), torch.ones_like(num))
    return scales.reshape(-1, 1, 1, 1)
