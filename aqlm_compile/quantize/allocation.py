"""Bit allocation under a total budget (issue 14 item 3; `bit_budget.py` measures the options and calls this):
each layer has options (a config and what it costs in bits and in predicted loss); pick one per layer so the total
bits fit the budget and the summed predicted loss is smallest.

`allocate` is the classic greedy for a separable multiple-choice knapsack: every layer starts at its cheapest
option, then the upgrade with the largest loss reduction per extra bit is taken while it fits. On each layer's lower
convex hull of (bits, loss) — options off the hull are never worth taking — the greedy is optimal whenever the
upgrades it takes exhaust the budget exactly, and within one upgrade of optimal otherwise.

`prefix_losses` gives the predicted losses cheaply: one residual k-means with M codebooks yields the M-codebook,
(M−1)-codebook, … quantizations as its prefixes, so one fit scores every `Mx8gG` option of a layer.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch

from .kmeans import residual_kmeans


@dataclass(frozen=True)
class Option:
    """One way to store a layer: `name` (e.g. a config "3x8g8"), its exact `bits`, its predicted `loss`."""

    name: str
    bits: int
    loss: float


def lower_hull(options: list[Option]) -> list[Option]:
    """The options worth considering, by increasing bits: strictly decreasing loss, convex (each upgrade buys less
    loss per bit than the one before)."""
    pts = sorted(options, key=lambda o: (o.bits, o.loss))
    kept: list[Option] = []
    for o in pts:
        if kept and o.loss >= kept[-1].loss:
            continue  # more bits, no less loss
        while len(kept) >= 2:
            a, b = kept[-2], kept[-1]
            # drop b if going a -> o directly is at least as steep a loss drop per bit as a -> b
            if (a.loss - o.loss) * (b.bits - a.bits) >= (a.loss - b.loss) * (o.bits - a.bits):
                kept.pop()
            else:
                break
        kept.append(o)
    return kept


def allocate(options: dict[str, list[Option]], budget_bits: int) -> dict[str, Option]:
    """One option per layer, total bits ≤ `budget_bits`, by the greedy described in the module docstring. Raises
    ValueError naming the smallest possible total when even the cheapest options do not fit."""
    hulls = {}
    for layer, opts in options.items():
        if not opts:
            raise ValueError(f"layer {layer}: no options")
        hulls[layer] = lower_hull(opts)
    level = {layer: 0 for layer in hulls}
    total = sum(h[0].bits for h in hulls.values())
    if total > budget_bits:
        raise ValueError(f"a budget of {budget_bits} bits is below the smallest possible total, {total} bits")
    heap = []

    def push(layer):
        h, i = hulls[layer], level[layer]
        if i + 1 < len(h):
            slope = (h[i].loss - h[i + 1].loss) / (h[i + 1].bits - h[i].bits)
            heapq.heappush(heap, (-slope, layer))

    for layer in hulls:
        push(layer)
    while heap:
        _, layer = heapq.heappop(heap)
        h, i = hulls[layer], level[layer]
        extra = h[i + 1].bits - h[i].bits
        if total + extra > budget_bits:
            continue  # this upgrade does not fit; cheaper ones of other layers still may
        total += extra
        level[layer] = i + 1
        push(layer)
    return {layer: hulls[layer][level[layer]] for layer in hulls}


def prefix_losses(weight: torch.Tensor, hessian: torch.Tensor, num_codebooks: int, codebook_size: int, group: int,
                  generator: torch.Generator, iters: int = 10, max_points: int | None = 16384,
                  row_weights: torch.Tensor | None = None) -> list[float]:
    """Hessian-weighted errors Σ_j r_j (W − Ŵ_m)_j H (W − Ŵ_m)_jᵀ of the first m = 1..`num_codebooks` codebooks of
    one residual k-means (scales = row norms, as `layer.init_codes`); r = `row_weights` [out] (default all 1: the
    layer's output error; `bit_budget` passes each output's Fisher, so that layers compare). Before any AQ round,
    so above what the full quantizer reaches; what allocation needs is how the error falls with m."""
    w = weight.detach().float()
    out_features, in_features = w.shape
    scales = w.norm(dim=1, keepdim=True) + 1e-9
    groups = (w / scales).reshape(-1, group)
    books, codes = residual_kmeans(groups, num_codebooks, codebook_size, iters, generator, max_points)
    recon = torch.zeros_like(groups)
    losses = []
    h = hessian.float()
    for m in range(num_codebooks):
        recon += books[m][codes[:, m]]
        delta = w - recon.reshape(out_features, in_features) * scales
        per_row = ((delta @ h) * delta).sum(1)
        losses.append(float(per_row.sum() if row_weights is None else (per_row * row_weights.float()).sum()))
    return losses
