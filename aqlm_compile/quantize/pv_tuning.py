"""PV-tuning (Malinovskii et al. 2024, "PV-Tuning: Beyond Straight-Through Estimation for Extreme LLM
Compression"; the AQLM reference's `src/pv_optimizer.py`): end-to-end fine-tuning that updates the codes too.

Runs in the AQLM method's `finish` (after the blocks, the optional lm_head and global fine-tuning) when
`pv_steps > 0` — the `--preset pv` run, which can start from an existing checkpoint (`quantize --from-checkpoint`).
Each step, on KL(teacher ‖ student) over a batch of calibration windows:

- **P** (continuous): Adam on every floating parameter but the embeddings and a dense head — codebooks, scales,
  norms, biases — as global fine-tuning does (`global_ft.py`).
- **V** (discrete): each AQLM layer keeps a straight-through buffer, a dense fp32 copy of its weight that takes the
  gradient w.r.t. the decoded weight. The buffer moves by `pv_code_lr` of its norm per step (an Adam direction,
  β₁ = `pv_code_beta1` — the reference's 0 by default — and β₂ = 0.95, scaled to a fixed relative step like the
  reference's LAMB trust ratio). With `pv_buffer_follows_p` the buffer first takes P's change of the decoded weight
  (the reference's does not, so a codebook step looks like distance to the buffer there). `pv_code_metric` "input"
  measures the distance to the buffer with each input column weighted by its mean x² over the training windows
  seen so far (the diagonal of the XXᵀ in AQ's objective) instead of in plain L2. Then code groups are
  re-encoded to the buffer in that norm (one greedy pass over the codebooks; the scale of the row is kept), and
  only the `pv_max_code_change` fraction of groups whose error to the buffer drops most take their new codes.
  Only the 4× that many groups farthest from the buffer are re-encoded: a group cannot gain more than its
  distance.

P's lr follows `pv_lr_decay` (constant, or linear to 0 over the steps, as global fine-tuning's `global_lr_decay`).
The best state on the validation windows is kept, as in global fine-tuning.
"""

from __future__ import annotations

import math
import types

import torch
import torch.nn.functional as F

from ..nn import AqlmLinear, pack_codes
from .distributed import SINGLE, Ranks
from .global_ft import KlObjective, end_to_end_parameters, improves, lr_factor, step_gradients
from .presets import QuantizeSettings

_CODE_BETA2 = 0.95
_EPS = 1e-12


def reencode_groups(t: torch.Tensor, codes: torch.Tensor, books: torch.Tensor, order: list[int],
                    chunk_groups: int = 1 << 16, weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One greedy pass over the codebooks in `order` for N scale-normalised target groups t [N, g] with codes
    int64 [N, M] and codebooks [M, K, g]: for each codebook m, the codeword nearest to the target minus the
    other codebooks' codewords, in L2 or, with `weights` [N, g] ≥ 0, in the weighted norm Σ_k w_k (t_k − ĉ_k)².
    Returns (new codes [N, M], gain [N] = err(ĉ_old) − err(ĉ_new) in that norm, ≥ 0 up to rounding since no slot
    gets worse)."""
    num_codebooks = codes.shape[-1]
    new = codes.clone()
    gain = torch.empty(t.shape[0])
    norms = books.pow(2).sum(-1)  # [M, K]

    def err(r, w):
        return (r.pow(2) if w is None else r.pow(2) * w).sum(-1)

    for start in range(0, t.shape[0], chunk_groups):
        sl = slice(start, start + chunk_groups)
        c, w = new[sl], None if weights is None else weights[sl]
        recon = sum(books[m][c[:, m]] for m in range(num_codebooks))
        before = err(t[sl] - recon, w)
        for m in order:
            recon -= books[m][c[:, m]]
            if w is None:
                score = torch.addmm(norms[m], t[sl] - recon, books[m].T, alpha=-2.0)  # ‖c‖² − 2 r·c
            else:  # Σ w c² − 2 Σ w r c
                score = torch.addmm(w @ books[m].pow(2).T, (t[sl] - recon) * w, books[m].T, alpha=-2.0)
            best = score.argmin(-1)
            c[:, m] = best
            recon += books[m][best]
        gain[sl] = before - err(t[sl] - recon, w)
    return new, gain


def _books(codebooks: torch.Tensor, num_codebooks: int) -> torch.Tensor:
    return codebooks.detach().reshape(num_codebooks, codebooks.shape[1], -1).float()


def reencode_l2(target: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor,
                order: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """`reencode_groups` over every group of a layer: target [out, in]; codes int64 [out, G, M]; codebooks
    [M, K, 1, g] or [M, K, g]; scales [out] (any shape). Returns (codes [out, G, M], gain [out, G] in weight units)."""
    out, num_groups, num_codebooks = codes.shape
    books = _books(codebooks, num_codebooks)
    s = scales.detach().reshape(-1).float()
    t = (target.float() / s[:, None]).reshape(out * num_groups, -1)
    new, gain = reencode_groups(t, codes.reshape(-1, num_codebooks), books, order)
    return new.reshape(codes.shape), gain.reshape(out, num_groups) * (s * s)[:, None]


# The V step re-encodes only this many times its budget of groups: those whose decoded weight is farthest from the
# buffer. A group's gain can never exceed that distance, so the groups left out are the ones with the least to gain;
# re-encoding every group each step would cost more than the step's forward and backward.
_CANDIDATES_PER_CHANGE = 4


class _StraightThrough:
    """One AQLM layer's straight-through buffer and its moment state (the first moment only with momentum)."""

    def __init__(self, layer: AqlmLinear, beta1: float = 0.0, follow_p: bool = False, metric: str = "l2"):
        self.layer, self.beta1, self.metric = layer, beta1, metric
        with torch.no_grad():
            self.buffer = layer.weight().detach().float().clone()
        # follow_p: the buffer also takes P's change of the decoded weight (codebooks, scales), so that its distance
        # to the decoded weight is V's own steps only; `decoded` is the weight the buffer last saw
        self.decoded = self.buffer.clone() if follow_p else None
        self.sq = torch.zeros_like(self.buffer)
        self.mean = torch.zeros_like(self.buffer) if beta1 > 0 else None
        self.steps = 0

    @torch.no_grad()
    def step(self, grad: torch.Tensor, code_lr: float, max_change: float, order: list[int],
             input_energy: torch.Tensor | None = None) -> float:
        """Move the buffer along -grad, re-encode toward it; returns the fraction of code groups changed.
        `input_energy` [in]: the mean x_j² of the layer's inputs, which weights the distance to the buffer when the
        metric is "input" (the diagonal of the XXᵀ that AQ's objective uses)."""
        self.steps += 1
        grad = grad.float()
        layer = self.layer
        if self.decoded is not None:
            current = layer.weight().detach().float()
            self.buffer.add_(current - self.decoded)
            self.decoded = current
        self.sq.mul_(_CODE_BETA2).addcmul_(grad, grad, value=1 - _CODE_BETA2)
        if self.mean is not None:  # Adam's bias-corrected first moment
            grad = self.mean.mul_(self.beta1).add_(grad, alpha=1 - self.beta1) / (1 - self.beta1 ** self.steps)
        direction = grad / (self.sq / (1 - _CODE_BETA2 ** self.steps)).sqrt().clamp_min(_EPS)
        norm = direction.norm()
        if not torch.isfinite(norm) or norm == 0:
            return 0.0
        self.buffer.sub_(direction, alpha=(code_lr * self.buffer.norm() / norm).item())
        codes = layer.unpacked_codes()
        out, num_groups, num_codebooks = codes.shape
        budget = int(max_change * out * num_groups)
        if budget <= 0:
            return 0.0
        s = layer.scales.detach().reshape(-1).float()
        col = None
        if self.metric == "input":
            col = (input_energy if input_energy is not None else torch.ones(layer.in_features)).float()
            col = col / col.mean().clamp_min(_EPS)  # only ratios matter; keeps the gains in weight units
        sq_drift = (self.buffer - layer.weight().float()).pow(2)
        drift = (sq_drift if col is None else sq_drift * col).reshape(out * num_groups, -1).sum(-1)
        picked = drift.topk(min(drift.numel(), _CANDIDATES_PER_CHANGE * budget)).indices
        rows = picked // num_groups
        t = (self.buffer.reshape(out * num_groups, -1)[picked] / s[rows, None])
        flat = codes.reshape(-1, num_codebooks)
        weights = None if col is None else col.reshape(num_groups, -1)[picked % num_groups]
        new, gain = reencode_groups(t, flat[picked], _books(layer.codebooks, num_codebooks), order, weights=weights)
        gain = gain * s[rows] ** 2
        useful = (gain > 0) & (new != flat[picked]).any(-1)
        if not bool(useful.any()):
            return 0.0
        gain = torch.where(useful, gain, torch.full_like(gain, -1.0))
        keep = gain.topk(min(budget, int(useful.sum()))).indices
        flat[picked[keep]] = new[keep]
        layer.codes.copy_(pack_codes(flat.reshape(codes.shape), layer.config.nbits_per_codebook))
        if self.decoded is not None:
            self.decoded = layer.weight().detach().float()
        return keep.numel() / (out * num_groups)


def _forward_keeping_weight(self, x):
    # the decoded weight as a non-leaf whose gradient we keep: the V step's input
    w = self.weight()
    if w.requires_grad:
        w.retain_grad()
    if w.requires_grad and self._pv_collect_x2:
        # the training windows' mean x_j² so far: the "input" metric's column weights
        with torch.no_grad():
            x2 = x.detach().float().pow(2).reshape(-1, x.shape[-1])
            self._pv_x2 = x2.sum(0) + getattr(self, "_pv_x2", 0)
            self._pv_tokens = x2.shape[0] + getattr(self, "_pv_tokens", 0)
    self._pv_weight = w
    return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


class _WeightGradients:
    """The gradient of each layer's decoded weight over one batch: the last backward's (`_pv_weight.grad`), summed
    over micro-batches (`take` after each) and, with sharded windows, over the ranks (`summed`; a rank that ran no
    window of the batch adds zeros; one message per layer: a model's worth of weight gradients in one buffer would
    double the largest thing PV-tuning holds)."""

    def __init__(self, layers: dict):
        self.layers, self.sums = layers, {}

    def take(self) -> None:
        for name, layer in self.layers.items():
            w = getattr(layer, "_pv_weight", None)
            if w is not None and w.grad is not None:
                if name in self.sums:
                    self.sums[name].add_(w.grad)
                else:
                    self.sums[name] = w.grad
            layer._pv_weight = None  # the graph of this micro-batch can go

    def summed(self, name: str, ranks: Ranks) -> torch.Tensor | None:
        grad = self.sums.pop(name, None)
        if not ranks.sharded:
            return grad
        if grad is None:
            layer = self.layers[name]
            grad = torch.zeros(layer.out_features, layer.in_features, dtype=layer.codebooks.dtype,
                               device=layer.codebooks.device)
        ranks.sum_tensors_([grad])
        return grad


def pv_tune(model, tokens: torch.Tensor, teacher_hidden: torch.Tensor, train_idx: torch.Tensor,
            val_idx: torch.Tensor, settings: QuantizeSettings, generator: torch.Generator, on_step=None,
            teacher_head=None, ranks: Ranks = SINGLE) -> dict:
    """`settings.pv_steps` PV steps of `settings.pv_batch_size` windows (see the module docstring). Returns a report:
    steps, validation KL per evaluation, the mean fraction of code groups changed per step."""
    if settings.pv_steps <= 0:
        return {"steps": 0}
    params = end_to_end_parameters(model)
    opt = torch.optim.Adam(params, lr=settings.pv_lr, betas=(0.9, 0.95))
    layers = {name: m for name, m in model.named_modules() if isinstance(m, AqlmLinear)}
    buffers = {name: _StraightThrough(m, settings.pv_code_beta1, settings.pv_buffer_follows_p, settings.pv_code_metric)
               for name, m in layers.items()}
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: lr_factor(settings.pv_lr_decay, i, settings.pv_steps))
    for m in layers.values():
        m.forward = types.MethodType(_forward_keeping_weight, m)
        m._pv_collect_x2 = settings.pv_code_metric == "input"
    bs = settings.pv_batch_size
    objective = KlObjective(model, tokens, teacher_hidden, bs, teacher_head, ranks, settings.micro_batch_size,
                            settings.train_dtype)
    weight_grads = _WeightGradients(layers)

    def val_loss():
        return objective.mean(val_idx)

    steps_per_eval = max(1, int(math.ceil(len(train_idx) / bs)))  # one epoch of the training windows
    model.train(False)
    history = [val_loss()]
    best, best_state = history[0], {k: v.clone() for k, v in model.state_dict().items()}
    changed, step = [], 0
    try:
        while step < settings.pv_steps:
            perm = train_idx[torch.randperm(len(train_idx), generator=generator)]
            for start in range(0, len(perm), bs):
                if step >= settings.pv_steps:
                    break
                loss = step_gradients(objective, params, perm[start : start + bs], opt, weight_grads.take)
                opt.step()  # P: codebooks, scales, norms
                schedule.step()
                fractions = []
                for name, st in buffers.items():  # V: codes, toward each layer's buffer
                    order = torch.randperm(st.layer.config.num_codebooks, generator=generator).tolist()
                    energy = getattr(st.layer, "_pv_x2", None)
                    if energy is not None:
                        energy = energy / st.layer._pv_tokens
                    fractions.append(st.step(weight_grads.summed(name, ranks), settings.pv_code_lr,
                                             settings.pv_max_code_change, order, energy))
                changed.append(sum(fractions) / max(1, len(fractions)))
                step += 1
                if on_step:
                    on_step(loss)
                if step % steps_per_eval == 0 or step == settings.pv_steps:
                    current = val_loss()
                    history.append(current)
                    if improves(current, best):
                        best, best_state = current, {k: v.clone() for k, v in model.state_dict().items()}
    finally:
        for m in layers.values():
            del m.forward  # back to the class's forward
            for attr in ("_pv_weight", "_pv_x2", "_pv_tokens", "_pv_collect_x2"):
                m.__dict__.pop(attr, None)
    model.load_state_dict(best_state)
    for p in model.parameters():
        p.requires_grad_(False)
    return {"steps": step, "train_dtype": objective.train_dtype, "lr_decay": settings.pv_lr_decay,
            "code_beta1": settings.pv_code_beta1, "buffer_follows_p": settings.pv_buffer_follows_p,
            "code_metric": settings.pv_code_metric, "val_kl": [None if math.isnan(v) else v for v in history],
            "code_change_per_step": sum(changed) / max(1, len(changed))}
