"""The library functions behind the CLI verbs `quantize` and `eval` (the CLI only parses options)."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from .config import AqlmConfig, rtn_bits_for
from .errors import ModelError


def pick_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelError("--device cuda: no CUDA device is available")
    return device


def work_folder_for(out_dir: Path) -> Path:
    return out_dir.parent / f".{out_dir.name}.work"


def quantize_job(model_dir: str | None, out_dir: str, config: str | None = None, head_config: str | None = None,
                 dataset: str | None = "brown",
                 preset: str = "fast", method: str = "aqlm", seed: int = 0, resume: bool = False,
                 device: str = "auto", num_blocks: int | None = None, overrides: dict | None = None, reporter=None,
                 stop_after_block: int | None = None, from_checkpoint: str | None = None,
                 bits: float | None = None, embedding: str | None = None, head: str | None = None,
                 assignments=(), offload: str = "auto", shard_windows: bool = False) -> dict:
    """Quantize `model_dir` with `method` (a name in `quantize.methods`; AQLM by default) at `preset` plus
    `overrides` (settings fields), and write the checkpoint to `out_dir`. `config` defaults to 2x8g8; `head_config`
    also quantizes the lm_head with that config. `from_checkpoint`: an AQLM checkpoint of `model_dir` to start from
    instead of quantizing the blocks — only the method's end-to-end stage runs (e.g. `--preset pv`); its config and
    head config are the checkpoint's. `bits`: a whole-model budget in bits per parameter, met by a per-layer plan
    (`quantize/bit_budget.py`: `config`'s codeword width and group size, 1 to max(4, 2M) codebooks) with the input
    embedding counted in the form `embedding` (stored|int8|int4|head, what `build --embedding` will put in the
    artifact) and a dense lm_head in the form `head` (fp16|int8, `build --head`); the checkpoint records both and
    `build`/`eval` default to them. `assignments`: `NAME=VALUE` settings (`--set`), read
    as their fields' types; the named options in `overrides` win over them. `offload`: where the calibration
    activations live — "none" (memory), "disk" (files beside the output, read a batch at a time: memory that does
    not grow with the calibration set), "auto" (disk when they would take more than a quarter of this machine's
    memory). `shard_windows`: with several processes (torchrun, `quantize --nproc`), split the calibration windows
    over them too (quantize/distributed.py). Returns the run's report."""
    import torch

    from . import format as fmt
    from .data import calibration_windows, load_corpus, tokenize
    from .models import load_all_blocks, load_fp_model, move_model, resolve_model_dir
    from .progress import Reporter
    from .quantize.pipeline import quantize_model
    from .quantize.methods import get_method

    reporter = reporter or Reporter()
    method_cls = get_method(method)
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    quantizer = method_cls.from_preset(preset, {**method_cls.settings_class.parse_assignments(assignments), **given})
    settings = quantizer.settings
    out = Path(out_dir)
    if out.exists() and not fmt.is_checkpoint(out) and any(out.iterdir()):
        raise ModelError(f"{out}: exists and is not an AQLM checkpoint; refusing to overwrite it")
    if bits is None and embedding is not None:
        raise ModelError("--embedding: only with --bits (it says how the budget counts the embedding; build and eval "
                         "take their own --embedding)")
    if bits is None and head is not None:
        raise ModelError("--head: only with --bits (it says how the budget counts a dense lm_head; build and eval take "
                         "their own --head)")
    if head is not None and head_config is not None and head != "fp16":
        raise ModelError(f"--head {head}: not with --head-config (the lm_head is then quantized with AQLM)")
    if bits is not None and not 0 < bits < 16:
        raise ModelError(f"--bits {bits}: expected a budget between 0 and 16 bits per parameter")
    if bits is not None and num_blocks is not None:
        raise ModelError("--bits with --num-blocks: the budget counts every block's linears as quantized (the blocks "
                         "past N would stay in float and break it)")
    if from_checkpoint is not None:
        if shard_windows:
            raise ModelError("--shard-windows: not with --from-checkpoint (its end-to-end stage runs replicated)")
        if bits is not None:
            raise ModelError("--bits: not with --from-checkpoint (the checkpoint's layer configs are kept)")
        return _finish_job(model_dir, out, Path(from_checkpoint), config, head_config, num_blocks, resume, dataset,
                           preset, quantizer, seed, device, reporter)
    aqlm_config = AqlmConfig.parse(config or "2x8g8")
    head_aqlm = None if head_config is None else AqlmConfig.parse(head_config)
    source = resolve_model_dir(model_dir)
    device = pick_device(device)
    if shard_windows and not method_cls.supports_window_shards:
        raise ModelError(f"--shard-windows: method {method_cls.name!r} does not run on a split of the windows")
    ranks = _ranks(device, shard_windows)
    if shard_windows and ranks.world == 1:
        raise ModelError("--shard-windows: only with several processes (--nproc N > 1, or torchrun)")
    if not ranks.is_main:
        reporter = Reporter()  # one progress display: rank 0's
    start = time.perf_counter()
    offload = _offload_mode(offload, source, settings, ranks, quantizer.needs_teacher())
    # with --offload disk the FP blocks are read one at a time too (models.LazyBlocks), --bits's Fisher pass included
    # (bit_budget.output_fisher_by_blocks), unless the logits are more than lm_head(norm(h)): then loaded whole
    model, tokenizer = load_fp_model(source, lazy=offload == "disk")
    if bits is not None and getattr(model, "aqlm_lazy_blocks", None) is not None:
        from .quantize.bit_budget import logits_are_head_of_norm

        if not logits_are_head_of_norm(model.config):
            load_all_blocks(model)
    move_model(model, device)
    for name, linear in ((n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)):
        if ".layers." in f".{name}." and linear.in_features % aqlm_config.in_group_size:
            aqlm_config.check_shape(linear.out_features, linear.in_features, name)
    if head_aqlm is not None:
        lm_head = model.get_output_embeddings()
        if type(lm_head) is not torch.nn.Linear:
            raise ModelError(f"--head-config: {source}: the model's lm_head is not a linear layer")
        head_aqlm.check_shape(lm_head.out_features, lm_head.in_features, "lm_head")
    corpus = load_corpus(dataset)
    ids = tokenize(tokenizer, corpus.calibration)
    tokens = calibration_windows(ids, settings.nsamples, settings.seqlen, seed).to(device)
    load_seconds = time.perf_counter() - start
    # quantize_model adds the method and its settings to the fingerprint
    fingerprint = {"model": str(source.resolve()), "config": aqlm_config.name, "seed": seed, "dataset": corpus.name,
                   "num_blocks": num_blocks, **({"head_config": head_aqlm.name} if head_aqlm else {}),
                   # a sharded run's work folder holds one activation file per rank (quantize_model adds it too)
                   **({"window_shards": ranks.world} if ranks.sharded else {})}
    work = fmt.WorkFolder(work_folder_for(out))
    spill = _spill_folder(out, ranks, offload)
    plan, layer_configs, plan_seconds = None, None, 0.0
    if bits is not None:
        plan_start = time.perf_counter()
        if head is None:  # the form `build` stores by default: int8 rows for a dense head (an AQLM head: as is)
            from .embedding import default_head

            head = "fp16" if head_aqlm is not None else default_head(model)
        embedding = embedding or "stored"
        fingerprint.update({"bits": bits, "embedding": embedding, "base_config": aqlm_config.name})
        if head != "fp16":
            fingerprint["dense_head"] = head
        layer_configs, plan = _bit_plan(model, tokens, aqlm_config, head_aqlm, bits, embedding, head, seed,
                                        settings, work, fingerprint, resume, reporter, spill)
        fingerprint["layer_configs"] = {n: c.name for n, c in layer_configs.items()}
        aqlm_config = _most_common(layer_configs)
        fingerprint["config"] = aqlm_config.name
        plan_seconds = time.perf_counter() - plan_start
    reporter.log(f"model {source} | {aqlm_config.name} | {quantizer.name} preset {preset} | {settings.nsamples} x "
                 f"{settings.seqlen} calibration tokens from {corpus.name} ({len(ids)} tokens) | device {device}")
    torch.manual_seed(seed)
    try:
        report = quantize_model(model, tokens, aqlm_config, quantizer, seed=seed, work=work, resume=resume,
                                fingerprint=fingerprint, reporter=reporter, num_blocks=num_blocks,
                                stop_after_block=stop_after_block, head_config=head_aqlm,
                                layer_configs=layer_configs, ranks=ranks, spill=spill)
    finally:  # scratch files go whatever happens (the work folder keeps what --resume needs)
        if spill is not None:
            shutil.rmtree(spill, ignore_errors=True)
    report["timings"]["load"] = round(load_seconds, 1)
    report["offload"] = offload  # "disk": activations and FP blocks streamed from disk
    if bits is not None:
        report["timings"]["bit_plan"] = round(plan_seconds, 1)
    report["seconds"] = round(time.perf_counter() - start, 1)
    model.to("cpu")
    # config.json's aqlm_compile.method: {"name", "version", "settings"}; quantization_config stays the HF one
    recorded = {"head_config": head_aqlm.name, "head_untied": report["lm_head"]["untied"]} if head_aqlm else {}
    if plan is not None:
        recorded["bit_plan"] = plan
        recorded["embedding"] = embedding
        if head_aqlm is None:  # build/eval read the head in the form its budget counted (an explicit fp16 too)
            recorded["dense_head"] = head
    metadata = {**recorded, "preset": preset, "seed": seed,
                "dataset": corpus.name, "method": quantizer.record(),
                "calibration_sources": [corpus.calibration_sources[0], corpus.calibration_sources[-1]],
                "timings": report["timings"], "seconds": report["seconds"]}
    if ranks.world > 1:
        metadata["processes"] = ranks.world
    if ranks.sharded:
        metadata["window_shards"] = ranks.world
    if ranks.is_main:
        fmt.save(out, model, aqlm_config, source_dir=source, metadata=metadata,
                 extra_files={"quantize_report.json": json.dumps(report, indent=1)})
        work.remove()
    ranks.barrier()  # every rank returns once the checkpoint is there
    if spill is not None and ranks.is_main:
        shutil.rmtree(spill.parent, ignore_errors=True)
    reporter.log(f"wrote {out} in {report['seconds']:.0f} s  (phases: {report['timings']})")
    return report


OFFLOADS = ("auto", "none", "disk")


def _offload_mode(offload: str, source: Path, settings, ranks, teacher: bool) -> str:
    """"disk" or "none" for `quantize --offload`. "auto": disk when the activation buffers the block loop holds at
    once (inputs, targets, outputs, and the teacher's hidden states if the method needs them), or the FP weights
    in fp32, would take more than a quarter of this machine's memory (every rank of a --nproc run holds its own)."""
    if offload not in OFFLOADS:
        raise ModelError(f"--offload {offload!r}: expected one of {', '.join(OFFLOADS)}")
    if offload != "auto":
        return offload
    try:
        hidden = int(json.loads((source / "config.json").read_text()).get("hidden_size") or 0)
    except (OSError, ValueError, TypeError, AttributeError):
        hidden = 0  # load_fp_model names the bad file
    buffer = settings.nsamples * settings.seqlen * hidden * 4
    weights = sum(f.stat().st_size for f in source.glob("*.safetensors")) * 2  # fp32 from (mostly) 16-bit files
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    # every rank of a --nproc run holds its own buffers (a share of them with --shard-windows) and FP weights
    buffers = (3 + teacher) * buffer * (1 if ranks.sharded else ranks.world)
    return "disk" if max(buffers, ranks.world * weights) > memory / 4 else "none"


def _spill_folder(out: Path, ranks, offload: str) -> Path | None:
    """The folder this process keeps its activations in with `--offload disk`, emptied; None for "none"."""
    if offload == "none":
        return None
    folder = out.parent / f".{out.name}.spill" / f"rank-{ranks.rank}"
    shutil.rmtree(folder, ignore_errors=True)  # a killed run's scratch files (the work folder keeps what resumes)
    folder.mkdir(parents=True)
    return folder


def _ranks(device: str, shard_windows: bool = False):
    """This process's rank when torchrun started several (`quantize --nproc`, quantize/distributed.py)."""
    from .quantize.distributed import from_environment

    return from_environment(device, shard_windows)


def _most_common(configs: dict) -> AqlmConfig:
    """The config most linears have: the checkpoint's quantization_config (the others go to layer_configs)."""
    from collections import Counter

    counts = Counter(c.name for c in configs.values())
    return AqlmConfig.parse(max(counts, key=lambda n: (counts[n], n)))


# Windows the bit plan measures on (its Fisher pass is a forward and backward per window): enough to rank options
PLAN_WINDOWS = 16


def _bit_plan(model, tokens, base: AqlmConfig, head_aqlm, bits: float, embedding: str, head: str, seed: int,
              settings, work, fingerprint: dict, resume: bool, reporter, spill=None) -> tuple[dict, dict]:
    """({module name: config}, the plan's record for config.json) for `quantize --bits`. On --resume, the plan the
    interrupted run recorded in its work folder (the same budget, data and settings) is reused, not re-measured."""
    from .embedding import EMBEDDINGS, HEADS
    from .evaluate import param_counts
    from .quantize.bit_budget import fixed_bits, plan_bits

    if embedding not in EMBEDDINGS:
        raise ModelError(f"--embedding {embedding!r}: expected one of {', '.join(EMBEDDINGS)}")
    if head not in HEADS:
        raise ModelError(f"--head {head!r}: expected one of {', '.join(HEADS)}")
    if resume:
        recorded = work.fingerprint() or {}
        planned = ("layer_configs", "bit_plan", "config", "method")  # what the plan (and the block loop) add
        same = lambda fp: {k: v for k, v in fp.items() if k not in planned}  # noqa: E731
        if recorded.get("layer_configs") and same(recorded) == same(fingerprint):
            reporter.log("bit plan: the interrupted run's")
            fingerprint["bit_plan"] = recorded["bit_plan"]
            return ({n: AqlmConfig.parse(c) for n, c in recorded["layer_configs"].items()}, recorded["bit_plan"])
    params_all, _ = param_counts(model)
    try:
        fixed = fixed_bits(model, embedding, head_aqlm, head)
    except ValueError as exc:
        raise ModelError(str(exc)) from None
    plan = plan_bits(model, tokens[:PLAN_WINDOWS], base, bits, params_all, fixed, seed,
                     kmeans_max_points=settings.kmeans_max_points, reporter=reporter, spill=spill)
    record = plan.record()
    reporter.log(f"bit plan: {bits} bits/param asked, {record['total_bits_per_param']:.3f} planned; linears per "
                 f"config {record['linears_per_config']}")
    fingerprint["bit_plan"] = record
    return plan.configs, record


def _finish_job(model_dir, out: Path, start: Path, config, head_config, num_blocks, resume, dataset, preset,
                quantizer, seed, device, reporter) -> dict:
    """`quantize --from-checkpoint`: load the checkpoint, run the method's end-to-end stage against the FP model."""
    import torch

    from . import format as fmt
    from .data import calibration_windows, load_corpus, tokenize
    from .models import load_fp_model, resolve_model_dir
    from .quantize.pipeline import finish_model

    if not fmt.is_checkpoint(start):
        raise ModelError(f"--from-checkpoint {start}: not an AQLM checkpoint (no config.json with a quantization_config)")
    if start.resolve() == out.resolve():
        raise ModelError(f"--from-checkpoint {start}: the output must be another folder")
    for name, value in (("--head-config", head_config), ("--num-blocks", num_blocks), ("--resume", resume or None)):
        if value is not None:
            raise ModelError(f"{name}: not with --from-checkpoint (the checkpoint's blocks and head are kept as they are)")
    if not quantizer.needs_teacher():
        raise ModelError(f"--from-checkpoint with preset {preset!r}: the preset has no end-to-end stage to run "
                         "(use --preset pv, or a preset with global fine-tuning)")
    settings = quantizer.settings
    source = resolve_model_dir(model_dir)
    device = pick_device(device)
    ranks = _ranks(device)  # the end-to-end stage runs replicated: one process's result, written by rank 0
    t_start = time.perf_counter()
    model, aqlm_config, meta = fmt.load(start)
    if config is not None and AqlmConfig.parse(config).name != aqlm_config.name:
        raise ModelError(f"--config {config}: {start} is a {aqlm_config.name} checkpoint")
    fp_model, tokenizer = load_fp_model(source)
    keys = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads")
    want, got = fp_model.config.to_dict(), model.config.to_dict()
    differ = [k for k in keys if want.get(k) != got.get(k)]
    if differ:
        found = ", ".join(f"{k} {got.get(k)} vs {want.get(k)}" for k in differ)
        raise ModelError(f"--from-checkpoint {start}: not a checkpoint of {source} ({found})")
    model.to(device)
    fp_model.to(device)
    corpus = load_corpus(dataset)
    ids = tokenize(tokenizer, corpus.calibration)
    tokens = calibration_windows(ids, settings.nsamples, settings.seqlen, seed).to(device)
    load_seconds = time.perf_counter() - t_start
    reporter.log(f"model {source} | from {start.name} ({aqlm_config.name}) | {quantizer.name} preset {preset} | "
                 f"{settings.nsamples} x {settings.seqlen} calibration tokens from {corpus.name} | device {device}")
    torch.manual_seed(seed)
    report = finish_model(model, fp_model, tokens, aqlm_config, quantizer, seed=seed, reporter=reporter)
    del fp_model
    report["timings"]["load"] = round(load_seconds, 1)
    report["seconds"] = round(time.perf_counter() - t_start, 1)
    report["from_checkpoint"] = {"name": start.name, "method": meta.get("method"), "preset": meta.get("preset"),
                                 "seconds": meta.get("seconds")}
    model.to("cpu")
    head = {k: meta[k] for k in ("head_config", "head_untied", "bit_plan", "embedding", "dense_head") if k in meta}
    metadata = {**head, "preset": preset, "seed": seed, "dataset": corpus.name, "method": quantizer.record(),
                "from_checkpoint": report["from_checkpoint"],
                "calibration_sources": [corpus.calibration_sources[0], corpus.calibration_sources[-1]],
                "timings": report["timings"], "seconds": report["seconds"]}
    if ranks.is_main:
        fmt.save(out, model, aqlm_config, source_dir=source, metadata=metadata,
                 extra_files={"quantize_report.json": json.dumps(report, indent=1)})
    ranks.barrier()
    reporter.log(f"wrote {out} in {report['seconds']:.0f} s  (phases: {report['timings']})")
    return report


def eval_job(path: str, dataset: str | None = "brown", seqlen: int = 512, windows: int | None = 32,
             rtn: bool = True, fp: bool = True, reporter=None, embedding: str = "stored", head: str | None = None) -> dict:
    """Perplexity of a checkpoint (and of its FP source and an RTN baseline at the same code bits), or of an FP model.
    `embedding`: the checkpoint's input embedding as `build --embedding` puts it in an artifact (embedding.compact_embedding);
    `head`: its dense lm_head as `build --head` does (embedding.round_head; None: as `build` does by default,
    embedding.default_head)."""
    import torch

    from . import format as fmt
    from .data import eval_windows, load_corpus, tokenize
    from .evaluate import param_counts, perplexity, quantized_bits, rtn_quantize_, weight_bits
    from .models import load_fp_model, resolve_model_dir
    from .progress import Reporter

    reporter = reporter or Reporter()
    target = Path(path) if path is not None else None  # None: the embedded default FP model
    corpus = load_corpus(dataset)
    result: dict = {"path": str(target or resolve_model_dir(None)), "dataset": corpus.name, "seqlen": seqlen}
    timings = {}
    if target is not None and fmt.is_checkpoint(target):
        from .models import find_source_model

        model, aqlm_config, meta = fmt.load(target)
        if head is None:
            from .embedding import default_head

            head = default_head(model, meta.get("dense_head"))
        tokenizer = fmt.load_tokenizer(target)
        found = find_source_model(meta.get("source_model"), target)
        source = str(found) if found else None
        layer_names = list(fmt.quantized_modules(model))
        result.update({"config": aqlm_config.name, "quantized_layers": len(layer_names), **quantized_bits(model)})
        # every parameter of the model as quantized, counted before a compact embedding replaces its table
        params_all, _ = param_counts(model, head_untied=bool(meta.get("head_untied")))
        try:
            stored_bits = weight_bits(model, embedding, head)
        except ValueError as exc:
            from .errors import ConfigError

            raise ConfigError(str(exc)) from None
        if embedding != "stored":
            from .errors import ConfigError
            from .embedding import compact_embedding

            try:
                compact_embedding(model, embedding)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
            result["embedding"] = embedding
        if head != "fp16":
            from .embedding import round_head

            round_head(model, head)  # after compact_embedding: a compact embedding keeps the rows it was made from
        result["head"] = head
        # the whole model (embeddings, norms, an fp16 head, ...): the file's bytes over every parameter
        file_bytes = (target / fmt.WEIGHTS).stat().st_size
        # ... and the weights as an artifact with this embedding form stores them (what `quantize --bits` budgets)
        result.update({"file_bytes": file_bytes, "params_all": params_all,
                       "bits_per_param_all": file_bytes * 8 / params_all,
                       "weight_bits_per_param_all": stored_bits / params_all})
    else:
        if embedding != "stored" or head not in (None, "fp16"):
            from .errors import ConfigError

            raise ConfigError(f"--embedding {embedding} / --head {head}: {path} is not an AQLM checkpoint")
        source = str(resolve_model_dir(path))
        model, tokenizer = load_fp_model(Path(source))
        aqlm_config, layer_names = None, None
        result["bits_per_param"] = float(torch.finfo(next(model.parameters()).dtype).bits)  # dense, as evaluated
    bos = tokenizer.bos_token_id
    ids = tokenize(tokenizer, corpus.heldout)
    win = eval_windows(ids, seqlen, windows, bos)
    result.update({"windows": win.shape[0], "tokens_scored": win.shape[0] * (win.shape[1] - 1),
                   "bos": tokenizer.bos_token if bos is not None else None})
    t = time.perf_counter()
    result["ppl"] = perplexity(model, win, bos is not None, reporter=reporter, label="ppl")
    timings["ppl"] = round(time.perf_counter() - t, 1)
    del model
    if aqlm_config is not None and fp and source and Path(source, "config.json").is_file():
        fp_model, _ = load_fp_model(Path(source))
        t = time.perf_counter()
        result["fp_ppl"] = perplexity(fp_model, win, bos is not None, reporter=reporter, label="fp ppl")
        timings["fp_ppl"] = round(time.perf_counter() - t, 1)
        del fp_model
    elif aqlm_config is None:
        result["fp_ppl"] = result["ppl"]
    elif fp:
        result["fp_ppl"] = None
        result["fp_note"] = f"FP source model {meta.get('source_model')!r} not found beside the checkpoint or in the cache"
    if rtn and source and Path(source, "config.json").is_file():
        rtn_model, _ = load_fp_model(Path(source))
        nbits = rtn_bits_for(aqlm_config) if aqlm_config else 2
        with torch.no_grad():
            info = rtn_quantize_(rtn_model, nbits, 128, layer_names)
        t = time.perf_counter()
        result["rtn_ppl"] = perplexity(rtn_model, win, bos is not None, reporter=reporter, label=f"rtn{nbits} ppl")
        timings["rtn_ppl"] = round(time.perf_counter() - t, 1)
        result["rtn_bits_per_param"] = info["bits_per_param"]
        result["rtn"] = (f"{nbits}-bit round-to-nearest, asymmetric, groups of 128 (a shorter last group where the "
                         "inputs are not a multiple of 128, counted in the bits), fp16 scale and zero")
    result["timings"] = timings
    return result
