"""One transformer block: run it over the calibration activations (collecting XXᵀ per linear) and fine-tune it
with codes frozen on the MSE to the FP block's outputs (docs/quantization.md steps 2, 3 and 5)."""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F

from .activations import empty_like
from .distributed import SINGLE, Ranks
from .precision import compute_context, resolve_train_dtype
from .presets import QuantizeSettings


class BlockRunner:
    """Calls a decoder layer on a batch of hidden states with the keyword arguments captured from the model
    (position embeddings, masks, position ids), broadcast to the batch size."""

    def __init__(self, kwargs: dict):
        self.kwargs = kwargs

    def _expand(self, value, batch: int):
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == 1 and batch > 1:
            return value.expand(batch, *value.shape[1:])
        if isinstance(value, tuple):
            return tuple(self._expand(v, batch) for v in value)
        return value

    def __call__(self, block, hidden: torch.Tensor) -> torch.Tensor:
        kwargs = {k: self._expand(v, hidden.shape[0]) for k, v in self.kwargs.items()}
        out = block(hidden, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    def run(self, block, inputs, batch_size: int):
        """The block's outputs for every window of `inputs` (a tensor, or activations on disk: the outputs go where
        the inputs are)."""
        outs = empty_like(inputs)
        with torch.no_grad():
            for start in range(0, inputs.shape[0], batch_size):
                outs[start : start + batch_size] = self(block, inputs[start : start + batch_size])
        return outs


def collect_hessians(block, linears: dict, runner: BlockRunner, inputs: torch.Tensor, batch_size: int,
                     ranks: Ranks = SINGLE):
    """FP outputs of the block and H = mean xxᵀ (float64 accumulation) for each linear.

    Linears fed the same tensor (q/k/v, gate/up) share one H, computed once per batch. With sharded windows
    (`ranks.sharded`) the sums and the token count are those of every rank's windows (all-reduced in float64).
    """
    sums: list[torch.Tensor] = []
    slot_of: dict[str, int] = {}
    # Inputs seen in the current batch, by address; holding the tensors keeps their memory from being reused
    # by a different tensor of the same shape later in the same forward.
    seen: dict[tuple, tuple[int, torch.Tensor]] = {}

    def make_hook(name):
        def hook(module, args):
            x = args[0].detach()
            key = (x.data_ptr(), tuple(x.shape), x.stride())
            if key in seen:
                slot_of.setdefault(name, seen[key][0])
                return
            if name not in slot_of:
                slot_of[name] = len(sums)
                sums.append(torch.zeros(x.shape[-1], x.shape[-1], dtype=torch.float64, device=x.device))
            flat = x.reshape(-1, x.shape[-1]).float()
            sums[slot_of[name]] += (flat.T @ flat).double()  # fp32 per batch, fp64 across batches
            seen[key] = (slot_of[name], x)
        return hook

    count = 0
    handles = [m.register_forward_pre_hook(make_hook(n)) for n, m in linears.items()]
    try:
        outs = empty_like(inputs)
        with torch.no_grad():
            for start in range(0, inputs.shape[0], batch_size):
                batch = inputs[start : start + batch_size]
                seen.clear()
                outs[start : start + batch_size] = runner(block, batch)
                seen.clear()
                count += batch.shape[0] * batch.shape[1]
    finally:
        for h in handles:
            h.remove()
    if ranks.sharded:  # every rank ran the same linears in the same order: the slots match
        for s in sums:
            ranks.sum_(s)
        count = int(ranks.sum_(torch.tensor([count], dtype=torch.float64)).item())
    # one tensor per input: linears fed the same one get the same object (so callers can group them by identity)
    shared = [(s / count).float() for s in sums]
    hessians = {name: shared[slot] for name, slot in slot_of.items()}
    return outs, hessians


def trainable_parameters(block) -> list[torch.nn.Parameter]:
    """Codebooks, scales, norms, biases (and any linear left in float); never the integer codes."""
    params = []
    for p in block.parameters():
        if p.dtype.is_floating_point:
            p.requires_grad_(True)
            params.append(p)
    return params


def finetune_block(block, runner: BlockRunner, inputs: torch.Tensor, targets: torch.Tensor, train_idx: torch.Tensor,
                   val_idx: torch.Tensor, settings: QuantizeSettings, generator: torch.Generator,
                   on_step=None, ranks: Ranks = SINGLE) -> dict:
    """Adam on the element-mean MSE to the FP outputs, validation early stop, best parameters restored.

    `train_idx`/`val_idx` index all the windows; with sharded windows (`ranks.sharded`) `inputs`/`targets` hold this
    rank's slice, each rank runs the windows of a batch it holds and the gradients are summed over the ranks: one
    process's batches and steps, data-parallel (distributed.py). `settings.micro_batch_size`: the windows of a batch
    go through forward and backward that many at a time, the gradients accumulated (the same step, to rounding,
    with the memory of a micro-batch)."""
    if settings.finetune_epochs <= 0:
        return {"epochs": 0}
    device = inputs.device
    dtype = resolve_train_dtype(settings.finetune_dtype, device)

    def forward(x: torch.Tensor) -> torch.Tensor:
        """The block's output in fp32, computed in `dtype` (bf16 autocast: mixed precision, the MSE stays fp32)."""
        with compute_context(device, dtype):
            out = runner(block, x)
        return out.float()

    params = trainable_parameters(block)
    opt = torch.optim.Adam(params, lr=settings.finetune_lr, betas=(0.9, 0.95))
    numel = math.prod(targets.shape[1:])
    n_windows = len(train_idx) + len(val_idx)
    chunked = ranks.sharded or settings.micro_batch_size is not None

    def summed_error(idx: torch.Tensor, scale: float | None = None) -> float:
        """Σ squared error over the windows of global `idx` this rank holds, a micro-batch at a time; with `scale`,
        each micro-batch's sum × scale is also back-propagated (gradients accumulate)."""
        local = ranks.local(idx, n_windows)
        step = settings.micro_batch_size or max(1, len(local))
        total = 0.0
        for start in range(0, len(local), step):
            part = local[start : start + step]
            error = F.mse_loss(forward(inputs[part]), targets[part], reduction="sum")
            if scale is not None:
                (error * scale).backward()
            total += error.item()
        return total

    def val_loss() -> float:
        if len(val_idx) == 0:
            return float("nan")
        with torch.no_grad():
            total = 0.0
            for start in range(0, len(val_idx), settings.finetune_batch_size):
                idx = val_idx[start : start + settings.finetune_batch_size]
                if chunked:
                    total += summed_error(idx)
                else:
                    total += F.mse_loss(forward(inputs[idx]), targets[idx], reduction="sum").item()
            return ranks.sum_floats([total])[0] / (len(val_idx) * numel)

    best = val_loss()
    history = [best]
    best_state = copy.deepcopy(block.state_dict())
    bad = 0
    epochs_run = 0
    for _ in range(settings.finetune_epochs):
        perm = train_idx[torch.randperm(len(train_idx), generator=generator)]
        if settings.finetune_max_steps is not None:
            perm = perm[: settings.finetune_max_steps * settings.finetune_batch_size]
        for start in range(0, len(perm), settings.finetune_batch_size):
            idx = perm[start : start + settings.finetune_batch_size]
            opt.zero_grad(set_to_none=True)
            if chunked:  # this rank's share of the batch's element mean, by micro-batches; summed over ranks
                summed_error(idx, 1.0 / (len(idx) * numel))
                ranks.sum_gradients(params)
            else:
                loss = F.mse_loss(forward(inputs[idx]), targets[idx])
                loss.backward()
            opt.step()
            if on_step:
                on_step()
        epochs_run += 1
        current = val_loss()
        history.append(current)
        if len(val_idx) == 0 or current < best:
            best, bad = current, 0
            best_state = copy.deepcopy(block.state_dict())
        else:
            bad += 1
            if bad >= settings.finetune_early_stop:
                break
    block.load_state_dict(best_state)
    for p in block.parameters():
        p.requires_grad_(False)
    report = {"epochs": epochs_run, "val_mse": [None if math.isnan(v) else v for v in history]}
    if dtype != "float32":  # fp32 runs keep their old report
        report["dtype"] = dtype
    return report
