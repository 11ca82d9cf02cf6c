"""One linear layer: residual k-means init, then rounds of (codebook/scale update, beam search on codes) until
the relative improvement of the loss falls below the tolerance (docs/quantization.md step 4).

The codebook update is either the reference's Adam (`codebook_solver="adam"`) or an exact least-squares solve
(`"cg"`: preconditioned conjugate gradients on the codebooks, then closed-form row scales), which reaches a
lower loss in a third of the time on layers with outlier input channels."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..config import AqlmConfig
from .beam_search import beam_search
from .codebook_update import solve_codebooks, solve_scales, update_codebooks
from .kmeans import residual_kmeans
from .objective import layer_loss, relative_error
from .presets import QuantizeSettings


@dataclass
class LayerResult:
    codes: torch.Tensor  # int64 [out, in/g, M]
    codebooks: torch.Tensor  # [M, K, 1, g]
    scales: torch.Tensor  # [out, 1, 1, 1]
    losses: list[float] = field(default_factory=list)  # loss at the start of each round, then the final loss
    relative_error: float = float("nan")
    seconds: float = 0.0


def init_codes(weight: torch.Tensor, config: AqlmConfig, settings: QuantizeSettings, generator: torch.Generator):
    """Scales = row norms; k-means on the scale-normalised groups. Returns (codes, codebooks, scales)."""
    out_features, in_features = weight.shape
    g, m, k = config.in_group_size, config.num_codebooks, config.codebook_size
    scales = weight.norm(dim=1, keepdim=True) + 1e-9
    groups = (weight / scales).reshape(-1, g)
    max_points = settings.kmeans_max_points
    codebooks, codes = residual_kmeans(groups, m, k, settings.kmeans_iters, generator, max_points)
    return codes.view(out_features, in_features // g, m), codebooks.unsqueeze(2), scales.view(-1, 1, 1, 1)


def quantize_weight(weight: torch.Tensor, hessian: torch.Tensor, config: AqlmConfig, settings: QuantizeSettings,
                    generator: torch.Generator) -> LayerResult:
    start = time.perf_counter()
    weight = weight.detach().float()
    hessian = hessian.float()
    config.check_shape(*weight.shape)
    codes, codebooks, scales = init_codes(weight, config, settings, generator)
    losses: list[float] = []
    best = float("inf")
    for _ in range(settings.max_rounds):
        loss = layer_loss(weight, hessian, codes, codebooks, scales)
        if not torch.isfinite(torch.tensor(loss)):
            raise FloatingPointError(f"layer loss became {loss}")
        losses.append(loss)
        if best < float("inf") and loss / best > 1.0 - settings.relative_tolerance:
            break
        best = min(best, loss)
        if settings.codebook_solver == "cg":
            codebooks = solve_codebooks(weight, hessian, codes, codebooks, scales, settings.cg_iters)
            scales = solve_scales(weight, hessian, codes, codebooks)
        else:
            codebooks, scales = update_codebooks(weight, hessian, codes, codebooks, scales, settings.adam_steps,
                                                 settings.adam_lr)
        codes = beam_search(weight, hessian, codes, codebooks, scales, settings.beam_size, generator)
    losses.append(layer_loss(weight, hessian, codes, codebooks, scales))
    return LayerResult(codes, codebooks, scales, losses, relative_error(weight, hessian, codes, codebooks, scales),
                       time.perf_counter() - start)
