"""Codebook and scale update with codes fixed (reference §2.5): Adam on tr(ΔW H ΔWᵀ)/out.

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
