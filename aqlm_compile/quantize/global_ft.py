"""Global fine-tuning (paper App. A, "AQLM⋆"): codes frozen; codebooks, scales and norms trained end to end on
KL(teacher ‖ student) over next-token distributions. The teacher is the FP model, represented by its cached
final hidden states; teacher logits are recomputed through the (frozen, shared) lm_head per batch."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .distributed import SINGLE, Ranks
from .presets import QuantizeSettings


def kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(p_teacher ‖ p_student)."""
    s = F.log_softmax(student_logits.float().flatten(0, -2), dim=-1)
    t = F.log_softmax(teacher_logits.float().flatten(0, -2), dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean")


def end_to_end_parameters(model) -> list[torch.nn.Parameter]:
    """Every floating parameter except the embeddings and a dense lm_head (a quantized head's codebooks and scales
    are included), with requires_grad set accordingly: what end-to-end fine-tuning (global, PV) trains."""
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    dense_head = list(head.parameters()) if type(head) is torch.nn.Linear else []
    frozen = {id(p) for p in dense_head + list(embed.parameters())}
    params = []
    for p in model.parameters():
        trainable = p.dtype.is_floating_point and id(p) not in frozen
        p.requires_grad_(trainable)
        if trainable:
            params.append(p)
    return params


class KlObjective:
    """KL(teacher ‖ student) on calibration windows: the teacher is the FP model's final hidden states through
    `teacher_head` (the FP lm_head when the model's own head is quantized; else the model's head).

    `tokens` are all the windows; with sharded windows (`ranks.sharded`, distributed.py) `teacher_hidden` holds this
    rank's slice, `loss` is this rank's share of the batch's mean (None when it holds no window of the batch: its
    gradients are zeros) and the caller sums the gradients over the ranks; `mean` is over every rank's windows."""

    def __init__(self, model, tokens: torch.Tensor, teacher_hidden: torch.Tensor, batch_size: int, teacher_head=None,
                 ranks: Ranks = SINGLE):
        self.head = model.get_output_embeddings()
        self.teacher_head = teacher_head if teacher_head is not None else self.head
        self.base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
        self.tokens, self.teacher_hidden, self.batch_size = tokens, teacher_hidden, batch_size
        self.ranks, self.lo = ranks, ranks.windows(tokens.shape[0])[0]

    def loss(self, idx: torch.Tensor) -> torch.Tensor | None:
        if not self.ranks.sharded:
            hidden = self.base(input_ids=self.tokens[idx]).last_hidden_state
            with torch.no_grad():
                teacher = self.teacher_head(self.teacher_hidden[idx])
            return kl_loss(self.head(hidden), teacher)
        local = self.ranks.local(idx, self.tokens.shape[0])
        if len(local) == 0:
            return None
        hidden = self.base(input_ids=self.tokens[self.lo + local]).last_hidden_state
        with torch.no_grad():
            teacher = self.teacher_head(self.teacher_hidden[local])
        s = F.log_softmax(self.head(hidden).float().flatten(0, -2), dim=-1)
        t = F.log_softmax(teacher.float().flatten(0, -2), dim=-1)
        # kl_loss's "batchmean" divides by the batch's tokens: here by the whole batch's, over every rank
        return F.kl_div(s, t, log_target=True, reduction="sum") / (len(idx) * self.tokens.shape[1])

    def mean(self, idx: torch.Tensor) -> float:
        """Mean loss over windows `idx` (no gradient); NaN for none."""
        if len(idx) == 0:
            return float("nan")
        bs = self.batch_size
        with torch.no_grad():
            parts = [self.loss(idx[i : i + bs]) for i in range(0, len(idx), bs)]
            total = sum(0.0 if p is None else p.item() * len(idx[i * bs : i * bs + bs]) for i, p in enumerate(parts))
        return self.ranks.sum_floats([total])[0] / len(idx)


def backward_summed(loss: torch.Tensor | None, params, ranks: Ranks) -> None:
    """`loss.backward()`, then (sharded windows) the gradients summed over the ranks; a rank without a window of the
    batch (`loss` None) adds zeros."""
    if loss is not None:
        loss.backward()
    ranks.sum_gradients(params)


def improves(current: float, best: float) -> bool:
    """Whether a validation loss replaces the best one so far: never a NaN (a diverged state is not kept), and
    any finite loss beats a NaN start."""
    return not math.isnan(current) and (math.isnan(best) or current < best)


def global_finetune(model, tokens: torch.Tensor, teacher_hidden: torch.Tensor, train_idx: torch.Tensor,
                    val_idx: torch.Tensor, settings: QuantizeSettings, generator: torch.Generator,
                    on_step=None, teacher_head=None, ranks: Ranks = SINGLE) -> dict:
    """Trains every floating parameter except the embeddings and a dense lm_head (a quantized head's codebooks and
    scales train like the blocks'). Keeps the best state on validation. `teacher_head`: the FP lm_head when the
    model's own head is quantized (the teacher's logits must not go through it)."""
    if settings.global_epochs <= 0:
        return {"steps": 0}
    params = end_to_end_parameters(model)
    opt = torch.optim.Adam(params, lr=settings.global_lr, betas=(0.9, 0.95))
    bs = settings.global_batch_size
    objective = KlObjective(model, tokens, teacher_hidden, bs, teacher_head, ranks)
    loss_on = objective.loss

    def val_loss():
        return objective.mean(val_idx)

    total_steps = max(1, int(math.ceil(settings.global_epochs * len(train_idx) / bs)))
    history = [val_loss()]
    best, best_state = history[0], {k: v.clone() for k, v in model.state_dict().items()}
    model.train(False)
    step = 0
    while step < total_steps:
        perm = train_idx[torch.randperm(len(train_idx), generator=generator)]
        for start in range(0, len(perm), bs):
            if step >= total_steps:
                break
            loss = loss_on(perm[start : start + bs])
            opt.zero_grad(set_to_none=True)
            backward_summed(loss, params, ranks)
            opt.step()
            step += 1
            if on_step:
                on_step(0.0 if loss is None else loss.item())
        current = val_loss()
        history.append(current)
        if improves(current, best):
            best, best_state = current, {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    for p in model.parameters():
        p.requires_grad_(False)
    return {"steps": step, "val_kl": [None if math.isnan(v) else v for v in history]}
