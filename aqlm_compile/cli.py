"""`aqlm-compile` command line. Each verb parses options and calls one library function (heavy imports lazily)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from .errors import AqlmError


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except AqlmError as exc:
            line = f"error: {type(exc).__name__}: {exc}"
            where = os.environ.get("AQLM_COMPILE_ERROR_FILE")  # a rank of `quantize --nproc`: its parent prints it
            if where:
                Path(where).write_text(line + "\n")
            else:
                click.echo(line, err=True)
            sys.exit(2)


def _target_names() -> list[str]:
    from .targets.registry import target_names

    return target_names()


class _RegistryChoice(click.Choice):
    """A choice among the names of a registry, read at parse time (one registered later is accepted too)."""

    def __init__(self, names):
        self._names = names
        super().__init__(())

    @property
    def choices(self):
        return tuple(self._names())

    @choices.setter
    def choices(self, value):  # click.Choice assigns in __init__; the registry is the source
        pass


def _method_names() -> list[str]:
    from .quantize.methods import method_names  # torch-free

    return method_names()


@click.group(cls=_Group)
@click.version_option(package_name="aqlm-compile")
def main():
    """AQLM quantization and export toolchain."""


@main.command()
@click.argument("model_dir", required=False)
@click.option("-o", "--output", "out_dir", required=True, help="Checkpoint directory to write (HF AQLM format).")
@click.option("--config", help="MxBgG: M codebooks of 2^B codewords, groups of g.  [default: 2x8g8; with "
              "--from-checkpoint, the checkpoint's]")
@click.option("--head-config", help="Also quantize the lm_head, with this MxBgG config (e.g. 2x8g8; a tied embedding "
              "is then stored on its own). Default: the lm_head stays fp16. Only a head with --config's config keeps "
              "the checkpoint loadable in transformers + aqlm.")
@click.option("--dataset", default="brown", show_default=True,
              help="'brown', 'shakespeare' (out of domain), a .txt file or a folder of .txt files.")
@click.option("--method", type=_RegistryChoice(_method_names), default="aqlm", show_default=True,
              help="Quantization method (a registered one: aqlm_compile/quantize/methods.py).")
@click.option("--preset", default="fast", show_default=True,
              help="The method's preset (aqlm: fast, quality, pv, paper, tiny); a name the method does not have is "
                   "refused with the list of those it has.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--resume", is_flag=True, help="Continue an interrupted run from its last saved block.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--nsamples", type=int, help="Override the preset's number of calibration windows.")
@click.option("--seqlen", type=int, help="Override the preset's calibration window length.")
@click.option("--beam-size", type=int, help="Override the preset's beam width.")
@click.option("--pv-steps", type=int, help="Override the preset's number of PV-tuning steps (0: none).")
@click.option("--num-blocks", type=int, help="Quantize only the first N blocks (the rest stay in float).")
@click.option("--from-checkpoint", "from_checkpoint",
              help="Start from this AQLM checkpoint of MODEL_DIR: its blocks and head are kept and only the method's "
                   "end-to-end stage runs (PV-tuning with --preset pv, or global fine-tuning).")
@click.option("--bits", type=float, help="A whole-model budget in bits per parameter (embedding, head and norms "
              "included): each group of linears gets 1-4 codebooks of --config's width and group size, more where "
              "the loss is most sensitive (quantize/bit_budget.py). The checkpoint then mixes configs: it loads in "
              "aqlm-compile, not in transformers + aqlm.")
@click.option("--embedding", type=click.Choice(["stored", "int8", "int4", "head"]),
              help="With --bits: the input embedding's form in the artifact, as the budget counts it (default stored; "
                   "recorded, and build/eval use it unless told otherwise).")
@click.option("--head", type=click.Choice(["fp16", "int8"]),
              help="With --bits: a dense lm_head's form in the artifact (and of an embedding tied to it), as the budget "
                   "counts it: fp16, or int8 rows with a per-row scale (default int8 for a dense lm_head; recorded, and "
                   "build/eval use it unless told otherwise).")
@click.option("--set", "assignments", multiple=True, metavar="NAME=VALUE",
              help="Override one of the method's settings (repeatable), e.g. --set global_lr=1e-5 --set "
                   "global_epochs=2; names and types: the method's settings dataclass (quantize/presets.py for aqlm). "
                   "Recorded in the checkpoint like the preset's.")
@click.option("--quiet", is_flag=True, help="Progress bars only, no per-block lines.")
@click.option("--offload", type=click.Choice(["auto", "none", "disk"]), default="auto", show_default=True,
              help="Where the calibration activations live: memory, or files beside the output read a batch at a "
                   "time (memory that does not grow with --nsamples; the same checkpoint). auto: disk when they "
                   "would take over a quarter of this machine's memory.")
@click.option("--nproc", type=click.IntRange(min=1), default=1, show_default=True,
              help="Quantize with this many processes on this machine (torch.distributed: gloo on CPU, NCCL on "
                   "CUDA; one thread each unless OMP_NUM_THREADS says otherwise): the linears of each block are dealt out over them, and the checkpoint is the one process "
                   "would write at the same threads per process (quantize/distributed.py). Across machines: torchrun "
                   "--nnodes K --nproc-per-node N -m aqlm_compile quantize ... (one shared file system).")
@click.option("--shard-windows", is_flag=True,
              help="With several processes: also split the calibration windows over them (forward passes, XXᵀ, "
                   "block and global fine-tuning data-parallel, each process holding its share of the activations). "
                   "Faster and smaller per process; the sums then run in another order, so the checkpoint is one of "
                   "the same quality, not one process's bit for bit (quantize/distributed.py).")
@click.pass_context
def quantize(ctx, model_dir, out_dir, config, head_config, dataset, method, preset, seed, resume, device, nsamples,
             seqlen, beam_size, pv_steps, num_blocks, from_checkpoint, bits, embedding, head, assignments, quiet,
             offload, nproc, shard_windows):
    """Quantize MODEL_DIR (default: the embedded SmolLM2-135M-Instruct) with AQLM and write a checkpoint."""
    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        sys.exit(_quantize_in_processes(ctx, nproc))
    from .jobs import quantize_job
    from .progress import default_reporter

    reporter = default_reporter(quiet)
    try:
        quantize_job(model_dir, out_dir, config=config, head_config=head_config, dataset=dataset, method=method,
                     preset=preset, seed=seed, resume=resume,
                     device=device, num_blocks=num_blocks, reporter=reporter,
                     overrides={"nsamples": nsamples, "seqlen": seqlen, "beam_size": beam_size,
                                "pv_steps": pv_steps},
                     from_checkpoint=from_checkpoint, bits=bits, embedding=embedding, head=head,
                     assignments=assignments, offload=offload, shard_windows=shard_windows)
    finally:
        reporter.close()
        if "WORLD_SIZE" in os.environ:  # started by torchrun: leave its process group cleanly
            import torch.distributed

            if torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()


@main.command(name="eval")
@click.argument("path", required=False)
@click.option("--dataset", default="brown", show_default=True,
              help="'brown', 'shakespeare' (out of domain: no preset calibrates on it), a .txt file or a folder of .txt "
                   "files; its held-out part is scored.")
@click.option("--seqlen", default=512, show_default=True, type=int)
@click.option("--windows", default=32, show_default=True, type=int, help="Number of held-out windows.")
@click.option("--no-rtn", is_flag=True, help="Skip the round-to-nearest baseline.")
@click.option("--embedding", type=click.Choice(["stored", "int8", "int4", "head"]),
              help="Evaluate with the input embedding as `build --embedding` puts it in an artifact.  [default: the "
                   "form a `quantize --bits` checkpoint records, else stored]")
@click.option("--head", type=click.Choice(["fp16", "int8"]),
              help="Evaluate with a dense lm_head (and an embedding tied to it) as `build --head` stores it.  "
                   "[default: as `build` does: the form a `quantize --bits` checkpoint records, else int8]")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def eval_(path, dataset, seqlen, windows, no_rtn, embedding, head, as_json):
    """Held-out perplexity of an AQLM checkpoint, its FP source and an RTN baseline (or of an FP model)."""
    from .jobs import eval_job
    from .progress import default_reporter

    reporter = default_reporter(quiet=True)
    try:
        result = eval_job(path, dataset=dataset, seqlen=seqlen, windows=windows, rtn=not no_rtn, reporter=reporter,
                          embedding=embedding or _recorded_embedding(path), head=head)
    finally:
        reporter.close()
    if as_json:
        click.echo(json.dumps(result))
        return
    click.echo(f"held-out: {result['dataset']}, {result['windows']} windows x {seqlen} tokens "
               f"(BOS {result['bos']!r} prefixed), {result['tokens_scored']} tokens scored")
    rows = [("FP", result.get("fp_ppl"), 32.0)]
    if "config" in result:
        rows.append((f"AQLM {result['config']}", result["ppl"], result["bits_per_param"]))
    if "rtn_ppl" in result:
        rows.append((f"RTN {result['rtn'].split(',')[0]}", result["rtn_ppl"], result["rtn_bits_per_param"]))
    click.echo(f"{'model':<28} {'ppl':>12} {'bits/param':>11}")
    for name, ppl, bits in rows:
        ppl_s = "n/a" if ppl is None else f"{ppl:.2f}"
        click.echo(f"{name:<28} {ppl_s:>12} {bits:>11.3f}")
    if result.get("head") == "int8":
        click.echo("AQLM row scored with the lm_head as int8 rows, as `build` stores it (--head fp16: as stored)")
    if "config" in result:
        click.echo("bits/param counts the quantized linears: codes + fp16 codebooks + fp16 scales")
        click.echo(f"whole checkpoint: {result['file_bytes'] / 1e6:.1f} MB (model.safetensors) = "
                   f"{result['bits_per_param_all']:.3f} bits/param over all {result['params_all'] / 1e6:.1f} M "
                   "parameters (embeddings, norms and an fp16 lm_head included)")
        click.echo(f"artifact weights (embedding {result.get('embedding', 'stored')}, head {result['head']}): "
                   f"{result['weight_bits_per_param_all'] * result['params_all'] / 8e6:.1f} MB = "
                   f"{result['weight_bits_per_param_all']:.3f} bits/param (what quantize --bits budgets)")


def _targets_taking(what: str) -> str:
    from .targets.registry import targets_with

    names = targets_with(lambda t: what in t.options) if what != "dense" else targets_with(lambda t: t.dense_baseline)
    return "/".join(names) or "no target"


@main.command()
@click.argument("checkpoint_dir")
@click.option("--target", type=_RegistryChoice(_target_names), required=True,
              help="A registered target (targets/registry.py).")
@click.option("-o", "--output", "out_dir", help="Artifact folder (default: CHECKPOINT_DIR-<target>).")
@click.option("--cpu", help="An LLVM CPU name; x86 also avx2 / avx512 (default: this machine's CPU; arm64: neoverse-n1).")
@click.option("--arch", "archs", help="cuda: comma-separated SM architectures (default sm_80,sm_86,sm_89,sm_90; "
              "PTX for compute_90 is always added).")
@click.option("--max-batch", default=8, show_default=True, help="Largest token count with a GEMV kernel (1..8).")
@click.option("--onnx/--no-onnx", "with_onnx", default=True, show_default=True,
              help="x86/arm64: also write the ONNX decoder (AqlmMatMul + portable) and the ORT op library.")
@click.option("--dense-model", "dense_model_dir", help="x86: also compile this FP model (ONNX and TVM) as the dense "
              "baseline.")
@click.option("--dense", "dense_from_source", is_flag=True, help="x86: --dense-model with the FP model the checkpoint "
              "was quantized from (recorded in its config.json).")
@click.option("--dense-dtype", type=click.Choice(["fp32", "fp16", "both"]), default="both", show_default=True,
              help="x86 TVM route: the dense baseline's stored weights (fp16 = the FP16 baseline, fp32 compute).")
@click.option("--onnx-dense/--no-onnx-dense", default=True, show_default=True,
              help="x86: with --dense/--dense-model, also the dense ONNX model (fp32; must stay under 2 GB).")
@click.option("--dump-ir", "dump_ir", help="ONNX route: write the exported graph before and after each pass to DIR.")
@click.option("--fuse/--no-fuse", default=True, show_default=True,
              help="ONNX route: fuse AQLM layers that share an input (q/k/v, gate/up) into one op.")
@click.option("--fuse-tvm/--no-fuse-tvm", "fuse_tvm", default=None,
              help="TVM route, CPU targets: fuse q/k/v and gate/up too, parameters concatenated at build time. "
                   "[default: on for --target x86, where an interleaved SmolLM2 decode A/B on a Zen 4 put the fused "
                   "step at 0.94x the unfused one's time with the same prefill (docs/tvm-and-ort-notes.md N35); off "
                   "for arm64 (not measured) and cuda (refused)]")
@click.option("--tvm/--no-tvm", "with_tvm", default=True, show_default=True,
              help="Also compile the whole model for the TVM runtime (Relax VM: prefill + decode).")
@click.option("--embedding", type=click.Choice(["stored", "int8", "int4", "head"]),
              help="The input embedding in the artifact (ONNX and TVM routes): as stored (fp16), int8 rows with a per-row "
                   "scale, int4 rows with an fp16 scale per 32 weights, or 'head': rows decoded from the AQLM lm_head of a "
                   "checkpoint quantized with --head-config whose embedding was tied to it (no bytes of its own).  "
                   "[default: the form a `quantize --bits` checkpoint records, else stored]")
@click.option("--onnx-external-data/--onnx-inline", "onnx_external_data", default=None,
              help="ONNX route: the weights in onnx/model.onnx.data beside the graphs (page-aligned, shared by the "
                   "AqlmMatMul and portable models), or inside each .onnx file.  [default: external past 1 GiB of "
                   "weights; a protobuf file cannot pass 2 GiB]")
@click.option("--head", type=click.Choice(["fp16", "int8"]),
              help="Both routes (TVM and ONNX): the dense lm_head (and an embedding tied to it) as stored, or int8 rows "
                   "with a per-row scale (half the bytes; SmolLM2 2x8g8 held-out PPL +0.24%: benchmarks/head_int8_ppl.py).  "
                   "[default: the form a `quantize --bits` checkpoint records, else int8; fp16 for --target cuda and "
                   "an AQLM head]")
@click.option("--prefill", type=click.Choice(["int8", "fp32"]), default="int8", show_default=True,
              help="CPU targets: the prompt GEMMs (more than --max-batch tokens). int8: int8 activations (a scale per "
                   "token and 64 inputs) times int8-decoded weights where the CPU has AVX-512 VNNI, as llama.cpp does "
                   "(SmolLM2 held-out PPL: benchmarks/int8_prefill_ppl.py); fp32: every product in fp32.")
@click.option("--ort-attention", "ort_attention", type=click.Choice(["aqlm", "ort"]), default="aqlm", show_default=True,
              help="ONNX route, CPU targets: each layer's attention (rotary, KV-cache append, grouped-query attention) as "
                   "the op library's aqlm.GroupQueryAttention on this project's TVM kernels, or as ONNX Runtime's own "
                   "com.microsoft.GroupQueryAttention (docs/tvm-and-ort-notes.md N33). The portable model always uses "
                   "ORT's.")
def build(checkpoint_dir, target, out_dir, cpu, archs, max_batch, with_onnx, dense_model_dir, dense_from_source,
          dense_dtype, onnx_dense, dump_ir, fuse, fuse_tvm, with_tvm, embedding, head, onnx_external_data, prefill,
          ort_attention):
    """Compile every quantized layer of a checkpoint into a deployable artifact folder (targets/plan.py)."""
    from .errors import ConfigError
    from .targets.plan import build as build_plan
    from .targets.registry import BuildOptions, get_target

    spec = get_target(target)
    if dense_from_source:
        dense_model_dir = _source_model(checkpoint_dir, dense_model_dir)
    # options a target does not read are refused, not ignored (the registry says which target reads which)
    if dense_model_dir and not spec.dense_baseline:
        raise ConfigError(f"--dense/--dense-model is for --target {_targets_taking('dense')} (got --target {target})")
    if archs and "archs" not in spec.options:
        raise ConfigError(f"--arch is for --target {_targets_taking('archs')} (got --target {target}; use --cpu)")
    if cpu and "cpu" not in spec.options:
        raise ConfigError(f"--cpu is for --target {_targets_taking('cpu')} (use --arch with {target})")
    options = BuildOptions(
        cpu=cpu, archs=tuple(a.strip() for a in archs.split(",")) if archs else None, max_batch=max_batch,
        onnx=with_onnx, tvm=with_tvm, fuse=fuse, fuse_tvm=fuse_tvm, dump_ir=dump_ir, dense_model_dir=dense_model_dir,
        dense_dtypes={"fp32": ("float32",), "fp16": ("float16",), "both": ("float32", "float16")}[dense_dtype],
        onnx_dense=onnx_dense, head=head, onnx_external_data=onnx_external_data, prefill=prefill,
        ort_attention=ort_attention, embedding=embedding or _recorded_embedding(checkpoint_dir))
    out_dir = out_dir or f"{checkpoint_dir.rstrip('/')}-{target}"
    manifest = build_plan(checkpoint_dir, spec, options, out_dir)
    where = manifest["target_spec"].get("mcpu") or f"{manifest['arch'].replace('+', ', ')} + PTX; checked from the built file"
    click.echo(f"wrote {out_dir}: {len(manifest['kernels'])} kernels for {len(manifest['layers'])} layers ({where})")


def _argv_of(ctx, skip: set[str]) -> list[str]:
    """The command line that gives `ctx`'s command the parameters it was given (those at their defaults left out)."""
    argv = []
    for param in ctx.command.params:
        value = ctx.params[param.name]
        if param.name in skip or value is None or value == param.default or value == ():
            continue
        if isinstance(param, click.Argument):
            argv.append(str(value))
        elif param.is_flag:
            if value:
                argv.append(param.opts[0])
            elif param.secondary_opts:
                argv.append(param.secondary_opts[0])
        elif param.multiple:
            for v in value:
                argv += [param.opts[0], str(v)]
        else:
            argv += [param.opts[0], str(value)]
    return argv


def _quantize_in_processes(ctx, nproc: int) -> int:
    """`quantize --nproc N`: this same command in N processes on this machine (torch.multiprocessing), joined by
    torch.distributed through the environment torchrun would give them (RANK, WORLD_SIZE, MASTER_ADDR/PORT). One
    rank failing stops the others; its one-line error is printed once (each rank writes it to a file, not to the
    terminal: every rank checks the same inputs). Returns the exit status."""
    import logging
    import socket
    import tempfile

    import torch.multiprocessing as mp

    argv = _argv_of(ctx, skip={"nproc"})
    with socket.socket() as sock:  # a free port for the rendezvous, on this machine only
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # torch logs a warning per rank it stops after another failed: the failure's own line says enough
    logging.getLogger("torch.multiprocessing.spawn").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="aqlm-compile-nproc-") as errors:
        try:
            mp.spawn(_quantize_rank, args=(nproc, port, argv, errors), nprocs=nproc, join=True)
            return 0
        except mp.ProcessRaisedException as exc:  # not an AqlmError: a bug, shown with its traceback
            click.echo(str(exc), err=True)
            return 1
        except mp.ProcessExitedException as exc:
            written = sorted(Path(errors).glob("rank-*.txt"))
            line = written[0].read_text().strip() if written else (
                f"error: rank {exc.error_index} of {nproc} stopped (exit status {exc.exit_code})")
            click.echo(line, err=True)
            return exc.exit_code if exc.exit_code and exc.exit_code > 0 else 1


def _quantize_rank(rank: int, world: int, port: int, argv: list[str], errors: str) -> None:
    import os

    import torch

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), AQLM_COMPILE_ERROR_FILE=f"{errors}/rank-{rank:04d}.txt")
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # as torchrun: one thread per process unless told otherwise
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    main(["quantize", *argv], standalone_mode=False)


def _recorded_form(path, key: str, forms: tuple[str, ...], default: str) -> str:
    """The form a `quantize --bits` checkpoint's budget counted (config.json aqlm_compile.KEY), else `default`;
    anything unreadable is left to the command's own checks."""
    try:
        meta = json.loads((Path(path) / "config.json").read_text()).get("aqlm_compile") or {}
    except (OSError, ValueError, TypeError, AttributeError):
        return default
    form = meta.get(key) if isinstance(meta, dict) else None
    return form if form in forms else default


def _recorded_embedding(path) -> str:
    """The input embedding's recorded form (`quantize --bits --embedding`), else "stored"."""
    return _recorded_form(path, "embedding", ("stored", "int8", "int4", "head"), "stored")


def _source_model(checkpoint_dir: str, dense_model_dir) -> str:
    """The FP model a checkpoint was quantized from (`--dense`), from its config.json."""
    from pathlib import Path

    from .errors import ConfigError, FormatError

    if dense_model_dir:
        raise ConfigError("--dense and --dense-model: give one (--dense uses the checkpoint's source model)")
    path = Path(checkpoint_dir) / "config.json"
    try:
        source = json.loads(path.read_text()).get("aqlm_compile", {}).get("source_model")
    except (OSError, json.JSONDecodeError) as exc:
        raise FormatError(f"{path}: not readable JSON ({exc})") from None
    from .models import find_source_model

    found = find_source_model(source, Path(checkpoint_dir))
    if found is None:
        raise ConfigError(f"{path}: aqlm_compile.source_model: the FP model {source!r} the checkpoint was quantized "
                          "from is neither beside the checkpoint nor in the model cache; pass --dense-model DIR")
    return str(found)


@main.command()
@click.argument("artifact_dir")
@click.argument("prompt")
@click.option("--runtime", type=click.Choice(["ort", "torch", "tvm"]), default="ort", show_default=True)
@click.option("--model", "model_kind", type=click.Choice(["aqlm", "portable", "dense", "dense-fp16"]), default="aqlm",
              show_default=True, help="The AQLM model, the FP baseline (built with --dense-model; ort and tvm; "
                                      "dense-fp16: tvm, fp16 weights), or the portable ONNX model (ort, no library).")
@click.option("--max-new-tokens", default=32, show_default=True, type=int)
@click.option("--temperature", default=0.0, show_default=True, type=float, help="0 = greedy.")
@click.option("--top-p", default=1.0, show_default=True, type=float)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--threads", type=int, help="Threads for the kernels (default: all cores).")
@click.option("--no-bos", is_flag=True, help="Do not prepend the BOS token.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the text.")
def generate(artifact_dir, prompt, runtime, model_kind, max_new_tokens, temperature, top_p, seed, threads, no_bos,
             as_json):
    """Generate from an artifact folder (or, with --runtime torch, a checkpoint folder too)."""
    from pathlib import Path

    from .errors import ConfigError
    from .runtime.generate import generate as run, load_tokenizer

    if threads is not None and threads < 1:
        raise ConfigError(f"--threads {threads}: expected ≥ 1")
    if runtime != "tvm" and model_kind == "dense-fp16":
        raise ConfigError("--model dense-fp16 is built for the TVM runtime only: use --runtime tvm")
    if runtime == "ort":
        from .runtime.ort import OrtDecoder

        decoder = OrtDecoder(artifact_dir, kind=model_kind, threads=threads)
        tok_dir = Path(artifact_dir) / "weights"
    elif runtime == "torch":
        from .runtime.torch_runtime import TorchDecoder, checkpoint_of

        decoder = TorchDecoder(artifact_dir, threads=threads)
        tok_dir = checkpoint_of(Path(artifact_dir))
    else:
        from .runtime.emulated import open_tvm_decoder

        if model_kind == "portable":
            raise ConfigError("--model portable is an ONNX model: use --runtime ort")
        model_kind = model_kind.replace("-", "_")
        # an arm64 artifact on this x86 machine runs through its own runner under qemu-user (slow: a check)
        decoder = open_tvm_decoder(artifact_dir, threads=threads, kind=model_kind)
        tok_dir = Path(artifact_dir) / "weights"
    result = run(decoder, load_tokenizer(tok_dir), prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                 top_p=top_p, seed=seed, add_bos=not no_bos)
    result["runtime"] = runtime if runtime != "ort" else f"ort/{model_kind}"
    if as_json:
        click.echo(json.dumps(result))
    else:
        click.echo(result["text"])
        tps = result["tokens_per_s"]
        click.echo(f"[{len(result['new_tokens'])} tokens, {tps:.1f} tokens/s decode, prefill "
                   f"{result['prefill_s']:.2f} s]" if tps else f"[{len(result['new_tokens'])} tokens]", err=True)


def _parse_shapes(text: str) -> list[tuple[int, int]]:
    from .errors import ConfigError

    shapes = []
    for item in text.split(","):
        try:
            out_f, in_f = (int(v) for v in item.lower().split("x"))
        except ValueError:
            raise ConfigError(f"--shapes {item!r}: expected OUTxIN such as 4096x4096") from None
        shapes.append((out_f, in_f))
    return shapes


@main.command()
@click.option("--kernels", is_flag=True, help="Benchmark the AQLM kernels against dense baselines.")
@click.option("--report", is_flag=True, help="The scoreboard: quality, speed, busy neighbour, memory and kernels "
              "against dense FP16 and llama.cpp, in one run (benchmarks/results/<machine>/report.{json,md} + plots).")
@click.option("--render", "render_path", help="Redraw report.md, the plots (and --readme) from this report.json.")
@click.option("--quick", is_flag=True, help="--report on a tiny model in a few minutes (CI); llama.cpp parts are "
              "skipped, with the reason printed, unless its tools are built.")
@click.option("--out", "out_dir", help="--report: output folder (default benchmarks/results/<machine>; --quick: "
              "a folder in the cache).")
@click.option("--build-llamacpp", is_flag=True, help="--report: build llama.cpp's tools first if needed (≈10 min).")
@click.option("--no-quantize", is_flag=True, help="--report: use only cached checkpoints (no 18+ min quantizations).")
@click.option("--synthetic-blocks", type=int, help="--report: blocks of the Llama-2-7B-shaped model (0: none).")
@click.option("--synthetic-head-config", help="--report: also measure the 7B-shaped model with its lm_head "
              "quantized by AQLM in this config, TVM route alone (default 4x8g8; 'none': not built).")
@click.option("--sections", help="--report: comma-separated subset of quality,speed,neighbour,kernels,gpu.")
@click.option("--readme", "readme_path", help="--report/--render: update this README's generated results block.")
@click.option("--decode-tokens", type=int, help="--report: single-token decode steps per measurement, every engine "
              "alike (default 256; a 7B-shaped model half; --quick 8).")
@click.option("--note", "notes", multiple=True, help="--report: context to keep in the report (repeatable).")
@click.option("--checkpoint", "extra_checkpoints", multiple=True,
              help="--report: also score this checkpoint of the default model, as CKPT[:EMBEDDING[:HEAD]] (EMBEDDING: "
                   "default the form it records, else stored; HEAD: fp16 or int8, default as `build --head`), its size the "
                   "weights its artifact stores (repeatable).")
@click.option("--shapes", default="4096x4096,11008x4096,4096x11008,576x576,1536x576,576x1536", show_default=True)
@click.option("--configs", default="2x8g8,1x16g8,8x8g32,1x8g8", show_default=True)
@click.option("--batch", "batches", default="1,4", show_default=True)
@click.option("--rounds", type=int, help="Interleaved rounds (kernels: 3, report: 2, quick: 1).")
@click.option("--threads", type=int, help="Threads for every engine/kernel (default: all cores; the aqlm package's "
              "kernel: 1 unless given).")
@click.option("--bf16", is_flag=True, help="--kernels: also time torch's bf16 matmul (oneDNN).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON list of records.")
@click.option("--markdown", "markdown_path", help="Also write the records as a markdown table to this file.")
@click.option("--json-out", "json_path", help="Also write the JSON records to this file.")
def bench(kernels, report, render_path, quick, out_dir, build_llamacpp, no_quantize, synthetic_blocks,
          synthetic_head_config, sections, readme_path, decode_tokens, notes, extra_checkpoints, shapes, configs,
          batches, rounds, threads, bf16, as_json, markdown_path, json_path):
    """Kernel timings (--kernels) or the whole scoreboard against dense FP16 and llama.cpp (--report)."""
    from .errors import ConfigError

    if sum(map(bool, (kernels, report, render_path))) != 1:
        raise ConfigError("bench: give exactly one of --kernels, --report, --render REPORT.json")
    if threads is not None and threads < 1:
        raise ConfigError(f"--threads {threads}: expected ≥ 1")
    if rounds is not None and rounds < 1:
        raise ConfigError(f"--rounds {rounds}: expected ≥ 1")
    if report:
        _bench_report(quick, out_dir, build_llamacpp, no_quantize, synthetic_blocks, sections, readme_path, rounds,
                      threads, notes, extra_checkpoints, decode_tokens, synthetic_head_config)
        return
    if render_path:
        from pathlib import Path

        from .bench.render import render_all

        if not Path(render_path).is_file():
            raise ConfigError(f"--render {render_path}: no such report.json")
        _check_readme(readme_path)
        render_all(Path(render_path), readme=Path(readme_path) if readme_path else None)
        click.echo(f"rendered {Path(render_path).parent / 'report.md'}")
        return
    from .bench.kernels import bench_kernels, markdown_table
    from .cache import atomic_write_bytes
    from .config import AqlmConfig

    cfgs = [AqlmConfig.parse(c).name for c in configs.split(",")]
    try:
        batch_list = [int(b) for b in batches.split(",")]
    except ValueError:
        raise ConfigError(f"--batch {batches!r}: expected comma-separated token counts such as 1,4,16") from None
    if any(b < 1 for b in batch_list):
        raise ConfigError(f"--batch {batches!r}: token counts must be ≥ 1")
    records = bench_kernels(_parse_shapes(shapes), cfgs, batch_list, rounds=rounds or 3,
                            log=(lambda m: click.echo(m, err=True)), threads=threads, bf16=bf16,
                            aqlm_package_threads=threads or 1)
    if markdown_path:
        atomic_write_bytes(markdown_path, markdown_table(records).encode())
    if json_path:
        atomic_write_bytes(json_path, (json.dumps(records, indent=1) + "\n").encode())
    if as_json:
        click.echo(json.dumps(records))


def _check_readme(readme_path) -> None:
    """Before measuring for an hour: the README exists and has the generated block's markers."""
    from pathlib import Path

    from .bench.render import README_BEGIN, README_END
    from .errors import ConfigError

    if readme_path is None:
        return
    path = Path(readme_path)
    text = path.read_text() if path.is_file() else None
    if text is None or README_BEGIN not in text or README_END not in text:
        raise ConfigError(f"--readme {readme_path}: expected a README with the lines {README_BEGIN[:22]}… and "
                          f"{README_END} around the generated results")


def _bench_report(quick, out_dir, build_llamacpp, no_quantize, synthetic_blocks, sections, readme_path, rounds,
                  threads, notes=(), extra_checkpoints=(), decode_tokens=None, synthetic_head_config=None):
    from pathlib import Path

    from . import format as fmt
    from .bench.report import ReportOptions, report_root, run_report
    from .embedding import EMBEDDINGS, HEADS
    from .errors import ConfigError

    kw = {"build_llamacpp": build_llamacpp, "quantize_missing": not no_quantize, "notes": tuple(notes)}
    extra = []
    for spec in extra_checkpoints:
        path, _, form = spec.partition(":")
        form, _, head = form.partition(":")
        if not fmt.is_checkpoint(Path(path)):
            raise ConfigError(f"--checkpoint {spec}: {path} is not an AQLM checkpoint")
        form = form or _recorded_embedding(path)
        head = head or None  # None: as `build` would (the recorded form, else int8: embedding.default_head)
        if form not in EMBEDDINGS:
            raise ConfigError(f"--checkpoint {spec}: embedding {form!r}: expected one of {', '.join(EMBEDDINGS)}")
        if head is not None and head not in HEADS:
            raise ConfigError(f"--checkpoint {spec}: head {head!r}: expected one of {', '.join(HEADS)}")
        meta = json.loads((Path(path) / "config.json").read_text()).get("aqlm_compile") or {}
        if form == "head" and not (meta.get("head_config") and meta.get("head_untied")):
            raise ConfigError(f"--checkpoint {spec}: embedding head needs a checkpoint quantized with --head-config "
                              "whose embedding was tied to the head")
        if head not in (None, "fp16") and meta.get("head_config"):
            raise ConfigError(f"--checkpoint {spec}: head {head} needs a dense lm_head (this one is AQLM "
                              f"{meta['head_config']})")
        extra.append((Path(path), form, head))
    if extra:
        if sections and "quality" not in sections:
            raise ConfigError("--checkpoint: its rows are in the quality section (add quality to --sections)")
        kw["checkpoints"] = tuple(extra)
    if threads:
        kw["threads"] = threads
    if rounds:
        kw["rounds"] = rounds
    if decode_tokens is not None:
        if decode_tokens < 1:
            raise ConfigError(f"--decode-tokens {decode_tokens}: expected ≥ 1")
        kw["gen"] = decode_tokens
    if synthetic_blocks is not None:
        if synthetic_blocks < 0:
            raise ConfigError(f"--synthetic-blocks {synthetic_blocks}: expected ≥ 0")
        kw["synthetic_blocks"] = synthetic_blocks
    if synthetic_head_config is not None:
        from .config import AqlmConfig

        if synthetic_head_config.lower() == "none":
            kw["synthetic_head_config"] = ""
        else:
            kw["synthetic_head_config"] = AqlmConfig.parse(synthetic_head_config).name  # a one-line ConfigError
    if sections:
        known = ("quality", "speed", "neighbour", "kernels", "gpu")
        chosen = tuple(s.strip() for s in sections.split(",") if s.strip())
        bad = [s for s in chosen if s not in known]
        if bad:
            raise ConfigError(f"--sections {sections!r}: unknown {bad}; expected some of {', '.join(known)}")
        kw["sections"] = chosen
    if readme_path:
        if quick:
            raise ConfigError("--readme: the README shows the full report only (drop --quick)")
        _check_readme(readme_path)
        kw["readme"] = Path(readme_path)
    if out_dir:
        kw["out_dir"] = Path(out_dir)
    elif quick:
        kw["out_dir"] = report_root() / "quick"
    opts = ReportOptions.quick_defaults(**kw) if quick else ReportOptions(**kw)
    run_report(opts, log=lambda m: click.echo(m, err=True))


if __name__ == "__main__":
    main()
