"""Blocks in order, each quantized on the outputs of the already-quantized blocks (reference §2.2):
capture block-0 inputs → per block: FP outputs + XXᵀ → AQ per linear → block fine-tuning → quantized outputs
→ save (resumable) → optional global KL fine-tuning."""

from __future__ import annotations

import time

import torch

from ..config import AqlmConfig
from ..format import WorkFolder, replace_module
from ..models import block_linears, decoder_layers
from ..nn import AqlmLinear
from ..progress import Reporter
from .block import BlockRunner, collect_hessians, finetune_block
from .global_ft import global_finetune
from .layer import quantize_weight
from .presets import QuantizeSettings

FORWARD_BATCH = 8


class _Captured(Exception):
    pass


def capture_inputs(model, first_block, tokens: torch.Tensor, with_teacher: bool):
    """Inputs to block 0 for every sequence, the block's keyword arguments (batch 1), and — when asked — the FP
    model's final hidden states (the teacher for global fine-tuning)."""
    inputs, kwargs_box = [], {}

    def hook(module, args, kwargs):
        inputs.append(args[0].detach().clone() if args else kwargs["hidden_states"].detach().clone())
        if not kwargs_box:
            kwargs_box.update({k: v for k, v in kwargs.items() if k != "hidden_states"})
        if not with_teacher:
            raise _Captured

    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    teacher = []
    try:
        with torch.no_grad():
            for i in range(tokens.shape[0]):
                try:
                    out = base(input_ids=tokens[i : i + 1], use_cache=False)
                    teacher.append(out.last_hidden_state.detach())
                except _Captured:
                    pass
    finally:
        handle.remove()
    kwargs_box["use_cache"] = False
    kwargs_box.pop("past_key_values", None)
    kwargs_box.pop("past_key_value", None)
    return torch.cat(inputs), kwargs_box, (torch.cat(teacher) if teacher else None)


def split_train_val(n: int, val_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[val_size:].sort().values, perm[:val_size].sort().values


def _generator(seed: int, *parts: int) -> torch.Generator:
    value = seed
    for p in parts:
        value = (value * 1_000_003 + p + 1) % (1 << 62)
    return torch.Generator().manual_seed(value)


def _quantize_block_linears(block, config: AqlmConfig) -> None:
    """Replace every linear of a block by an empty AqlmLinear of the same shape (for loading a saved block)."""
    for name, linear in block_linears(block).items():
        replace_module(block, name, AqlmLinear(linear.in_features, linear.out_features, config,
                                               bias=linear.bias is not None, dtype=linear.weight.dtype))


def quantize_model(model, tokens: torch.Tensor, config: AqlmConfig, settings: QuantizeSettings, seed: int = 0,
                   work: WorkFolder | None = None, resume: bool = False, fingerprint: dict | None = None,
                   reporter: Reporter | None = None, num_blocks: int | None = None,
                   stop_after_block: int | None = None) -> dict:
    """Quantize `model` in place. `tokens`: [nsamples, seqlen] calibration windows. Returns a report dict.

    `num_blocks` quantizes only the first N blocks (the rest stay in float). `stop_after_block` raises
    KeyboardInterrupt after that block is saved (used by tests to simulate an interruption).
    """
    reporter = reporter or Reporter()
    timings: dict[str, float] = {"capture": 0.0, "hessian": 0.0, "aq": 0.0, "block_ft": 0.0, "forward": 0.0,
                                 "global_ft": 0.0}
    torch.manual_seed(seed)
    _, layers = decoder_layers(model)
    n_blocks = len(layers) if num_blocks is None else min(num_blocks, len(layers))
    train_idx, val_idx = split_train_val(tokens.shape[0], settings.val_size, seed)
    for p in model.parameters():
        p.requires_grad_(False)

    t0 = time.perf_counter()
    with_teacher = settings.global_epochs > 0
    inputs, kwargs, teacher = capture_inputs(model, layers[0], tokens, with_teacher)
    runner = BlockRunner(kwargs)
    timings["capture"] += time.perf_counter() - t0

    start = 0
    if work is not None:
        start = work.start(fingerprint or {}, resume)
        if start > n_blocks:
            raise ValueError(f"work folder says {start} blocks are done, but only {n_blocks} are to be quantized")
        for i in range(start):
            _quantize_block_linears(layers[i], config)
            layers[i].load_state_dict(work.load_block(i))
        if start > 0:
            inputs = work.load_activations()
            reporter.log(f"resuming at block {start} of {n_blocks}")
    reports = work.reports() if (work is not None and start > 0) else []

    block_task = reporter.task("blocks", n_blocks)
    reporter.advance(block_task, start)
    for i in range(start, n_blocks):
        block = layers[i]
        linears = block_linears(block)
        block_start = time.perf_counter()
        t = time.perf_counter()
        targets, hessians = collect_hessians(block, linears, runner, inputs, FORWARD_BATCH)
        timings["hessian"] += time.perf_counter() - t

        layer_reports = {}
        layer_task = reporter.task(f"  block {i}: layers", len(linears))
        t = time.perf_counter()
        for li, (name, linear) in enumerate(linears.items()):
            reporter.update(layer_task, f"  block {i}: {name}")
            result = quantize_weight(linear.weight.detach(), hessians[name], config, settings, _generator(seed, i, li))
            new = AqlmLinear.from_parts(result.codes, result.codebooks, result.scales, config,
                                        bias=None if linear.bias is None else linear.bias.detach())
            new.requires_grad_(False)
            replace_module(block, name, new)
            layer_reports[name] = {"relative_error": result.relative_error, "rounds": len(result.losses) - 1,
                                   "seconds": round(result.seconds, 2)}
            reporter.advance(layer_task)
        timings["aq"] += time.perf_counter() - t
        del hessians
        reporter.update(layer_task, f"  block {i}: fine-tuning")

        t = time.perf_counter()
        ft = finetune_block(block, runner, inputs, targets, train_idx, val_idx, settings, _generator(seed, i, 999))
        timings["block_ft"] += time.perf_counter() - t

        t = time.perf_counter()
        outputs = runner.run(block, inputs, FORWARD_BATCH)
        out_err = ((outputs - targets).pow(2).sum() / targets.pow(2).sum()).item()
        timings["forward"] += time.perf_counter() - t
        inputs = outputs
        del targets
        report = {"block": i, "layers": layer_reports, "finetune": ft, "output_relative_mse": out_err,
                  "seconds": round(time.perf_counter() - block_start, 2)}
        reports.append(report)
        worst = max(layer_reports.items(), key=lambda kv: kv[1]["relative_error"])
        reporter.log(f"block {i:3d}: output rel. MSE {out_err:.4f}  worst layer {worst[0]} {worst[1]['relative_error']:.4f}"
                     f"  ft epochs {ft.get('epochs', 0)}  {report['seconds']:.1f}s")
        if work is not None:
            work.save_block(i, block.state_dict(), inputs, report)
        reporter.advance(block_task)
        if stop_after_block is not None and i == stop_after_block:
            raise KeyboardInterrupt(f"stopped after block {i} (stop_after_block)")

    global_report = {"steps": 0}
    if with_teacher:
        t = time.perf_counter()
        total = max(1, int(settings.global_epochs * len(train_idx) / settings.global_batch_size + 0.999))
        gtask = reporter.task("global fine-tuning", total)
        global_report = global_finetune(model, tokens, teacher, train_idx, val_idx, settings, _generator(seed, 10**6),
                                        on_step=lambda loss: reporter.advance(gtask))
        timings["global_ft"] += time.perf_counter() - t
        reporter.log(f"global fine-tuning: {global_report}")
    return {"blocks": reports, "global_finetune": global_report, "timings": {k: round(v, 1) for k, v in timings.items()},
            "quantized_blocks": n_blocks}
