"""The block loop, the same for every quantization method (docs/quantization.md step 2): blocks in order, each quantized on the
outputs of the already-quantized blocks. Capture block-0 inputs → per block: FP outputs + XXᵀ → the method's
`quantize_block` → quantized outputs → save (resumable) → after the last block, optionally the lm_head (its own
config: H of the final norm's outputs on the quantized model's activations, the method's `quantize_head`; a tied
embedding is untied and stays as it was) → the method's `finish`. `finish_model` runs only the last step, on a model
loaded from a checkpoint (`quantize --from-checkpoint`).
Methods (AQLM's AQ + block fine-tuning + global fine-tuning, and others) live behind `methods.py`."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..config import AqlmConfig
from ..errors import FormatError, ModelError
from ..format import WorkFolder, replace_module
from ..models import block_linears, decoder_layers, load_all_blocks, load_block, unload_block
from ..nn import AqlmLinear
from ..progress import Reporter
from .activations import DiskActivations, empty_like, relative_mse, release, spill_path
from .block import BlockRunner, collect_hessians
from .distributed import SINGLE, Ranks
from .methods import BlockContext, QuantizationMethod, RunContext

FORWARD_BATCH = 8


class _Captured(Exception):
    pass


def capture_inputs(model, first_block, tokens: torch.Tensor, with_teacher: bool, spill: Path | None = None):
    """Inputs to block 0 for every sequence, the block's keyword arguments (batch 1), and — when asked — the FP
    model's final hidden states (the teacher, for methods that fine-tune end to end: `needs_teacher()`).
    `spill`: a folder to keep both in (`activations.DiskActivations`, written a window at a time) instead of memory."""
    inputs, kwargs_box = [], {}
    n = tokens.shape[0]

    def keep(store: list, x: torch.Tensor):
        if spill is None:
            store.append(x.detach().clone())
            return
        if not store:
            store.append(DiskActivations(spill_path(spill), (n, *x.shape[1:]), x.dtype, x.device, spill))
        disk = store[0]
        disk[len(store) - 1 : len(store)] = x.detach()
        store.append(None)  # counts the windows written

    def hook(module, args, kwargs):
        keep(inputs, args[0] if args else kwargs["hidden_states"])
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
                    keep(teacher, out.last_hidden_state)
                except _Captured:
                    pass
    finally:
        handle.remove()
    kwargs_box["use_cache"] = False
    kwargs_box.pop("past_key_values", None)
    kwargs_box.pop("past_key_value", None)
    if spill is not None:
        return inputs[0], kwargs_box, (teacher[0] if teacher else None)
    return torch.cat(inputs), kwargs_box, (torch.cat(teacher) if teacher else None)


def teacher_by_blocks(model, inputs, runner: BlockRunner):
    """The teacher of `capture_inputs` (the FP model's final hidden states) for a lazily loaded model
    (`models.load_fp_model(lazy=True)`): block 0's captured `inputs` run through each FP block in turn, read from disk,
    run a window at a time (the whole-model pass's batch of 1: the same values) and dropped again, then the final
    norm. Buffers go where `inputs` are (memory or disk)."""
    _, layers = decoder_layers(model)
    hidden = inputs
    for j in range(len(layers)):
        outputs = runner.run(load_block(model, j), hidden, 1)
        unload_block(model, j)
        if hidden is not inputs:
            release(hidden)
        hidden = outputs
    norm = final_norm(model)
    teacher = empty_like(hidden)
    with torch.no_grad():
        for i in range(hidden.shape[0]):
            teacher[i : i + 1] = norm(hidden[i : i + 1])
    if hidden is not inputs:
        release(hidden)
    return teacher


def split_train_val(n: int, val_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[val_size:].sort().values, perm[:val_size].sort().values


def _quantize_block_linears(block, configs: dict[str, AqlmConfig]) -> None:
    """Replace every linear of a block by an empty AqlmLinear of the same shape and its config (for loading a saved
    block: every method leaves the linears of the blocks it quantized as AqlmLinear of those configs)."""
    for name, linear in block_linears(block).items():
        replace_module(block, name, AqlmLinear(linear.in_features, linear.out_features, configs[name],
                                               bias=linear.bias is not None, dtype=linear.weight.dtype))


def final_norm(model):
    """The norm between the last block and the lm_head (`model.model.norm` in Llama, Qwen2, Mistral, ...)."""
    base = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    norm = getattr(base, "norm", None)
    if not isinstance(norm, torch.nn.Module):
        raise ModelError(f"{type(model).__name__}: no final norm found (model.model.norm): cannot calibrate the lm_head")
    return norm


def head_hessian(model, hidden: torch.Tensor, batch_size: int, ranks: Ranks = SINGLE) -> torch.Tensor:
    """H = mean xxᵀ of the lm_head's inputs, x = final_norm(last block's outputs); fp64 accumulation as for blocks
    (with sharded windows, over every rank's)."""
    norm = final_norm(model)
    total = torch.zeros(hidden.shape[-1], hidden.shape[-1], dtype=torch.float64, device=hidden.device)
    with torch.no_grad():
        for start in range(0, hidden.shape[0], batch_size):
            x = norm(hidden[start : start + batch_size]).reshape(-1, hidden.shape[-1]).float()
            total += (x.T @ x).double()
    count = ranks.sum_floats([hidden.shape[0] * hidden.shape[1]])[0]
    return (ranks.sum_(total) / count).float()


def quantize_head(model, hidden: torch.Tensor, config: AqlmConfig, method: QuantizationMethod,
                  run: RunContext) -> dict:
    """Replace the lm_head by an AqlmLinear of `config`, quantized on the final norm of `hidden`. A tied embedding
    keeps the weights it had (the checkpoint then stores both, untied)."""
    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear:
        raise ModelError(f"{type(model).__name__}: the lm_head is a {type(head).__name__}, not a linear layer")
    config.check_shape(head.out_features, head.in_features, "lm_head")
    new, report = method.quantize_head(head, head_hessian(model, hidden, FORWARD_BATCH, run.ranks or SINGLE), config,
                                       run)
    embedding = model.get_input_embeddings()
    report["untied"] = embedding is not None and embedding.weight is head.weight
    if report["untied"]:
        embedding.weight = torch.nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    model.config.tie_word_embeddings = False
    ranks = run.ranks or SINGLE
    if ranks.world > 1:  # every rank quantized it alike; rank 0's bytes make the replicas certainly one model
        ranks.broadcast_module(new, 0)
    names = [n for n, m in model.named_modules() if m is head]
    replace_module(model, names[0], new)
    run.teacher_head = head
    return report


def quantize_model(model, tokens: torch.Tensor, config: AqlmConfig, method: QuantizationMethod, seed: int = 0,
                   work: WorkFolder | None = None, resume: bool = False, fingerprint: dict | None = None,
                   reporter: Reporter | None = None, num_blocks: int | None = None,
                   stop_after_block: int | None = None, head_config: AqlmConfig | None = None,
                   layer_configs: dict[str, AqlmConfig] | None = None, ranks: Ranks = SINGLE,
                   spill: Path | None = None) -> dict:
    """Quantize `model` in place with `method`. `tokens`: [nsamples, seqlen] calibration windows. Returns a report
    dict: per-block reports, whatever the method's `finish` returned, timings per phase.

    `fingerprint` identifies the run for `resume` (model, config, seed, data); the method's name, version and
    settings are added to it here, so a work folder is never resumed under another method or other settings.
    `num_blocks` quantizes only the first N blocks (the rest stay in float). `stop_after_block` raises
    KeyboardInterrupt after that block is saved (used by tests to simulate an interruption). `head_config`
    also quantizes the lm_head, with that config (it may differ from the blocks'). `layer_configs` {module name:
    config} overrides `config` per linear (a `quantize --bits` plan, bit_budget.py). `ranks`: this process's
    place among several quantizing together (distributed.py: the linears of each block are dealt out, the rest
    runs replicated, only rank 0 writes the work folder). `spill`: a folder for the activations (block inputs,
    targets, the teacher) instead of memory (`quantize --offload disk`, activations.py): the same checkpoint, with
    memory that does not grow with the calibration set.
    """
    reporter = reporter or Reporter()
    timings: dict[str, float] = {"capture": 0.0, "hessian": 0.0, **{p: 0.0 for p in method.phases}, "forward": 0.0}
    torch.manual_seed(seed)
    _, layers = decoder_layers(model)
    n_blocks = len(layers) if num_blocks is None else min(num_blocks, len(layers))
    train_idx, val_idx = split_train_val(tokens.shape[0], method.settings.val_size, seed)
    for p in model.parameters():
        p.requires_grad_(False)

    t0 = time.perf_counter()
    if spill is not None:
        Path(spill).mkdir(parents=True, exist_ok=True)
    lazy = getattr(model, "aqlm_lazy_blocks", None) is not None
    lo, hi = ranks.windows(tokens.shape[0])  # all of them unless --shard-windows
    inputs, kwargs, teacher = capture_inputs(model, layers[0], tokens[lo:hi], method.needs_teacher() and not lazy,
                                             spill)
    runner = BlockRunner(kwargs)
    if lazy and method.needs_teacher():
        teacher = teacher_by_blocks(model, inputs, runner)
    timings["capture"] += time.perf_counter() - t0
    run = RunContext(config=config, seed=seed, tokens=tokens, train_idx=train_idx, val_idx=val_idx, runner=runner,
                     reporter=reporter, teacher=teacher, timings=timings, ranks=ranks)

    layers_name, _ = decoder_layers(model)

    def configs_of(i: int) -> dict[str, AqlmConfig]:
        # names by path, not a module→name dict: such a dict would keep every FP linear alive after its block is
        # quantized (a lazily loaded model must hold one FP block at a time)
        names = {name: f"{layers_name}.{i}.{name}" for name in block_linears(layers[i])}
        if layer_configs is None:
            return {name: config for name in names}
        missing = [full for full in names.values() if full not in layer_configs]
        if missing:  # a plan for another model (or other module names): never fall back to a config silently
            raise ModelError(f"layer_configs: no config planned for {missing[0]} ({len(missing)} linear(s) of this block)")
        return {name: layer_configs[full] for name, full in names.items()}

    start = 0
    shard = f".rank{ranks.rank}-of-{ranks.world}" if ranks.sharded else ""  # this rank's activations file
    if work is not None:
        # sharded ranks each keep their windows' activations: resumable only with the same split
        split = {"window_shards": ranks.world} if ranks.sharded else {}
        start = _start_work(work, {**(fingerprint or {}), **split, "method": method.record()}, resume, ranks)
        if start > n_blocks:
            raise ValueError(f"work folder says {start} blocks are done, but only {n_blocks} are to be quantized")
        for i in range(start):
            _quantize_block_linears(layers[i], configs_of(i))
            load_block(model, i)  # lazily loaded: only what is not a quantized linear (norms) is read
            layers[i].load_state_dict(work.load_block(i))
        if start > 0:
            release(inputs)
            if ranks.sharded:  # every rank stops on a missing slice, not only its owner (the others would wait)
                missing = ranks.sum_floats([0.0 if work.has_activations(shard) else 1.0])[0]
                if missing:
                    raise FormatError(f"{work.path}: {int(missing)} of {ranks.world} ranks' activation files for "
                                      f"block {start} are missing; rerun without --resume")
            inputs = work.load_activations(on_disk=spill is not None, shard=shard)
            if spill is not None:
                inputs.spill, inputs.device = Path(spill), tokens.device
            reporter.log(f"resuming at block {start} of {n_blocks}")
    reports = work.reports() if (work is not None and start > 0) else []

    block_task = reporter.task("blocks", n_blocks)
    reporter.advance(block_task, start)
    for i in range(start, n_blocks):
        block = load_block(model, i)  # lazily loaded: read from the safetensors files now
        linears = block_linears(block)
        block_start = time.perf_counter()
        with run.timed("hessian"):
            targets, hessians = collect_hessians(block, linears, runner, inputs, FORWARD_BATCH, ranks)

        ctx = BlockContext(run=run, index=i, linears=linears, inputs=inputs, targets=targets, hessians=hessians,
                           configs=configs_of(i))
        del hessians  # the context holds them, so that the method can free them early
        method_report = method.quantize_block(block, ctx)
        del ctx

        with run.timed("forward"):
            outputs = runner.run(block, inputs, FORWARD_BATCH)
            out_err = relative_mse(outputs, targets, FORWARD_BATCH, ranks)
        release(inputs)
        release(targets)
        inputs = outputs
        del targets
        report = {"block": i, **method_report, "output_relative_mse": out_err,
                  "seconds": round(time.perf_counter() - block_start, 2)}
        reports.append(report)
        summary = method.describe_block(method_report)
        reporter.log(f"block {i:3d}: output rel. MSE {out_err:.4f}  " + (f"{summary}  " if summary else "")
                     + f"{report['seconds']:.1f}s")
        if work is not None and ranks.sharded:  # every rank commits its slice; rank 0 then names them
            work.save_activations(i, inputs, shard)
            ranks.barrier()
            if ranks.is_main:
                work.commit_block(i, block.state_dict(), report)
            ranks.barrier()
            work.drop_activations(i, shard)
        elif work is not None and ranks.is_main:
            work.save_block(i, block.state_dict(), inputs, report)
        reporter.advance(block_task)
        del linears, block  # the replaced FP linears go now, before the next block is read
        if stop_after_block is not None and i == stop_after_block:
            raise KeyboardInterrupt(f"stopped after block {i} (stop_after_block)")

    load_all_blocks(model)  # the blocks past --num-blocks stay in float: the head, `finish` and the file need them
    head_report = None
    if head_config is not None:
        with run.timed("forward"):
            for layer in layers[n_blocks:]:  # blocks left in float still feed the head
                outputs = runner.run(layer, inputs, FORWARD_BATCH)
                release(inputs)
                inputs = outputs
        head_report = quantize_head(model, inputs, head_config, method, run)
        reporter.log(f"lm_head: {head_config.name}, relative error {head_report['relative_error']:.4f}  "
                     f"{head_report['seconds']:.1f}s")
    finish_report = method.finish(model, run)
    return {"method": {"name": method.name, "version": method.settings.version}, "blocks": reports,
            **({"lm_head": head_report} if head_report else {}), **finish_report,
            "timings": {k: round(v, 1) for k, v in timings.items()}, "quantized_blocks": n_blocks}


def _start_work(work: WorkFolder, fingerprint: dict, resume: bool, ranks: Ranks) -> int:
    """`work.start` on rank 0 (it may clear the folder), its answer sent to the others; a failure there (another
    run's folder on --resume) stops every rank with rank 0's message instead of leaving them waiting."""
    if ranks.world == 1:
        return work.start(fingerprint, resume)
    start, error = -1, None
    if ranks.is_main:
        try:
            start = work.start(fingerprint, resume)
        except Exception as exc:  # re-raised below, once the other ranks know
            error = exc
    start = ranks.broadcast_int(start)
    if start < 0:  # every rank stops with rank 0's message (whichever the launcher reports)
        text = ranks.broadcast_text("" if error is None else f"{type(error).__name__}\n{error}")
        if error is not None:
            raise error
        name, _, message = text.partition("\n")
        from .. import errors

        cls = getattr(errors, name, None)
        raise (cls if isinstance(cls, type) and issubclass(cls, errors.AqlmError) else ModelError)(message)
    return start


def finish_model(model, fp_model, tokens: torch.Tensor, config: AqlmConfig, method: QuantizationMethod,
                 seed: int = 0, reporter: Reporter | None = None) -> dict:
    """Only the method's `finish` (its end-to-end stage: global fine-tuning, PV-tuning) on `model`, an AQLM model
    loaded from a checkpoint of `fp_model`: the teacher is `fp_model`'s final hidden states on `tokens` and its
    lm_head. `fp_model` is not changed. Returns a report shaped like `quantize_model`'s (no blocks)."""
    reporter = reporter or Reporter()
    timings: dict[str, float] = {"capture": 0.0, **{p: 0.0 for p in method.phases}}
    torch.manual_seed(seed)
    train_idx, val_idx = split_train_val(tokens.shape[0], method.settings.val_size, seed)
    for p in list(model.parameters()) + list(fp_model.parameters()):
        p.requires_grad_(False)
    t0 = time.perf_counter()
    teacher = None
    if method.needs_teacher():
        base = fp_model.get_decoder() if hasattr(fp_model, "get_decoder") else fp_model.model
        with torch.no_grad():
            teacher = torch.cat([base(input_ids=tokens[i : i + 1], use_cache=False).last_hidden_state
                                 for i in range(tokens.shape[0])])
    timings["capture"] += time.perf_counter() - t0
    _, layers = decoder_layers(model)
    inputs_kwargs = {"use_cache": False}
    run = RunContext(config=config, seed=seed, tokens=tokens, train_idx=train_idx, val_idx=val_idx,
                     runner=BlockRunner(inputs_kwargs), reporter=reporter, teacher=teacher, timings=timings,
                     teacher_head=fp_model.get_output_embeddings())
    finish_report = method.finish(model, run)
    return {"method": {"name": method.name, "version": method.settings.version}, "blocks": [], **finish_report,
            "timings": {k: round(v, 1) for k, v in timings.items()}, "quantized_blocks": len(layers)}
