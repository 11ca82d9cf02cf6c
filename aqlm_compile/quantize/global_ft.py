"""Global fine-tuning (paper App. A, "AQLM⋆"): codes frozen; codebooks, scales and norms trained end to end on
KL(teacher ‖ student) over next-token distributions. The teacher is the FP model, represented by its cached
final hidden states; teacher logits are recomputed through the (frozen, shared) lm_head per batch."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .distributed import SINGLE, Ranks
from .precision import compute_context, resolve_train_dtype
from .presets import QuantizeSettings


def kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(p_teacher ‖ p_student)."""
    s = F.log_softmax(student_logits.float().flatten(0, -2), dim=-1)
    t = F.log_softmax(teacher_logits.float().flatten(0, -2), dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean")


def end_to_end_parameters(model) -> list[torch.nn.Parameter]:
    """Every floating parameter except the embeddings and the dense linears (a dense lm_head, and the blocks that
    `--num-blocks` left in float: they stay as the FP model has them), with requires_grad set accordingly: what
    end-to-end fine-tuning (global, PV) trains — AQLM codebooks and scales (a quantized head's too), norms, biases
    of quantized linears."""
    dense = [p for m in model.modules() if type(m) is torch.nn.Linear for p in m.parameters()]
    frozen = {id(p) for p in dense + list(model.get_input_embeddings().parameters())}
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

    `tokens` are all the windows. A batch goes through `loss` whole, or — `chunked`: with sharded windows
    (`ranks.sharded`, distributed.py: `teacher_hidden` holds this rank's slice) or micro-batches (`micro`) — through
    `accumulate`, which back-propagates this rank's share of the batch's mean a micro-batch at a time (the caller
    then sums the gradients over the ranks). `mean` is over every rank's windows."""

    def __init__(self, model, tokens: torch.Tensor, teacher_hidden: torch.Tensor, batch_size: int, teacher_head=None,
                 ranks: Ranks = SINGLE, micro: int | None = None, train_dtype: str = "float32"):
        self.train_dtype = resolve_train_dtype(train_dtype, tokens.device)
        self.head = model.get_output_embeddings()
        self.teacher_head = teacher_head if teacher_head is not None else self.head
        self.base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
        self.tokens, self.teacher_hidden, self.batch_size = tokens, teacher_hidden, batch_size
        self.ranks, self.lo, self.micro = ranks, ranks.windows(tokens.shape[0])[0], micro
        self.chunked = ranks.sharded or micro is not None

    def loss(self, idx: torch.Tensor) -> torch.Tensor:
        """The batch's mean KL over its tokens, whole (not `chunked`)."""
        return kl_loss(*self._logits(self.tokens[idx], self.teacher_hidden[idx]))

    def _logits(self, tokens: torch.Tensor, teacher_hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(student, teacher) logits of windows `tokens`, in the precision `train_dtype` asks for."""
        with compute_context(tokens.device, self.train_dtype):
            hidden = self.base(input_ids=tokens).last_hidden_state
            with torch.no_grad():
                teacher = self.teacher_head(teacher_hidden)
            return self.head(hidden), teacher

    def _parts(self, idx: torch.Tensor) -> list[torch.Tensor]:
        """This rank's windows of global `idx` (positions in its slice), by micro-batches."""
        local = self.ranks.local(idx, self.tokens.shape[0])
        step = self.micro or max(1, len(local))
        return [local[i : i + step] for i in range(0, len(local), step)]

    def _summed(self, local: torch.Tensor) -> torch.Tensor:
        """KL summed over the tokens of this rank's windows `local`."""
        student, teacher = self._logits(self.tokens[self.lo + local], self.teacher_hidden[local])
        s = F.log_softmax(student.float().flatten(0, -2), dim=-1)
        t = F.log_softmax(teacher.float().flatten(0, -2), dim=-1)
        return F.kl_div(s, t, log_target=True, reduction="sum")

    def accumulate(self, idx: torch.Tensor, after_part=None) -> float:
        """Back-propagate this rank's share of batch `idx`'s mean KL (kl_loss's "batchmean": over the whole batch's
        tokens, every rank's), a micro-batch at a time, calling `after_part()` after each; returns the share."""
        tokens = len(idx) * self.tokens.shape[1]
        value = 0.0
        for part in self._parts(idx):
            loss = self._summed(part) / tokens
            loss.backward()
            if after_part is not None:
                after_part()
            value += loss.item()
        return value

    def mean(self, idx: torch.Tensor) -> float:
        """Mean loss over windows `idx` (no gradient); NaN for none."""
        if len(idx) == 0:
            return float("nan")
        bs = self.batch_size
        with torch.no_grad():
            if not self.chunked:
                return sum(self.loss(idx[i : i + bs]).item() * len(idx[i : i + bs])
                           for i in range(0, len(idx), bs)) / len(idx)
            total = sum(self._summed(part).item() for i in range(0, len(idx), bs) for part in self._parts(idx[i : i + bs]))
        return self.ranks.sum_floats([total / self.tokens.shape[1]])[0] / len(idx)


def step_gradients(objective: KlObjective, params, batch: torch.Tensor, opt, after_part=None) -> float:
    """The gradients of one batch's loss on `params` (zeroed first): whole, or by micro-batches and summed over the
    ranks (`objective.chunked`). Returns the loss (this rank's share when sharded)."""
    if not objective.chunked:
        loss = objective.loss(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if after_part is not None:
            after_part()
        return loss.item()
    opt.zero_grad(set_to_none=True)
    value = objective.accumulate(batch, after_part)
    objective.ranks.sum_gradients(params)
    return value


def improves(current: float, best: float) -> bool:
    """Whether a validation loss replaces the best one so far: never a NaN (a diverged state is not kept), and
    any finite loss beats a NaN start."""
    return not math.isnan(current) and (math.isnan(best) or current < best)


def lr_factor(decay: str, step: int, total: int) -> float:
    """global_lr's multiplier at 0-based `step` of `total`: 1 ("constant"), or 1 − step/total ("linear": the last
    step runs at global_lr / total)."""
    return 1.0 if decay == "constant" else 1.0 - step / total


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
    objective = KlObjective(model, tokens, teacher_hidden, bs, teacher_head, ranks, settings.micro_batch_size,
                            settings.train_dtype)

    def val_loss():
        return objective.mean(val_idx)

    total_steps = max(1, int(math.ceil(settings.global_epochs * len(train_idx) / bs)))
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: lr_factor(settings.global_lr_decay, i, total_steps))
    history = [val_loss()]
    best, best_state = history[0], {k: v.clone() for k, v in model.state_dict().items()}
    model.train(False)
    step = 0
    while step < total_steps:
        perm = train_idx[torch.randperm(len(train_idx), generator=generator)]
        for start in range(0, len(perm), bs):
            if step >= total_steps:
                break
            loss = step_gradients(objective, params, perm[start : start + bs], opt)
            opt.step()
            schedule.step()
            step += 1
            if on_step:
                on_step(loss)
        current = val_loss()
        history.append(current)
        if improves(current, best):
            best, best_state = current, {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    for p in model.parameters():
        p.requires_grad_(False)
    return {"steps": step, "train_dtype": objective.train_dtype, "lr_decay": settings.global_lr_decay,
            "val_kl": [None if math.isnan(v) else v for v in history]}
