"""The build plan: one recipe from an AQLM checkpoint to an artifact folder, for every registered target.

`build(checkpoint, target, options)`, in order:
1. **check** — the target's own checks (host, tools, option values) and the generic ones, before anything is read;
2. **load** — the checkpoint is loaded and validated exactly once (`format.load`);
3. **export** — each graph a route needs is exported once from that model (aqlm_compile/export.py): the ONNX
   route's decoder (any token count), the Relax route's `prefill` (any token count) and `decode` (one token);
4. **passes** — the pass pipeline on each graph (passes/pipeline.py), with the target's `supports` from the
   kernel table; layers are fused for the ONNX route only (the Relax route would redo the parameter
   concatenation on every call);
5. **kernel requests** — every quantized layer of the checkpoint (the kernel library's per-layer ABI, which
   runtime/kernels.py and the ORT op library call) plus every `aqlm_gemm` node of the lowered graphs (fused
   shapes): for each, a GEMV per batch 1..max_batch and an any-batch kernel where the kernel table has one for the
   target kind, each chosen by `kernels.registry.select_kernel`;
6. **compile and write** — the kernel library, then each route (ONNX decoder + portable twin + ORT op library;
   Relax VM library + params; the dense baselines), all into a temporary folder that is renamed into place with
   the manifest (sha256 of every file) — nothing half-written is left behind.

Targets (targets/registry.py) only supply data and toolchain hooks; nothing here names a target.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from aqlm_compile.config import AqlmConfig
from aqlm_compile.errors import ConfigError

from .registry import BuildOptions, Target, get_target

DECODER_PREFIX = "model."  # the export wrapper's attribute: stripped from layer names in reports


@dataclass(frozen=True)
class KernelRequest:
    out_features: int
    in_features: int
    config: AqlmConfig
    partitions: tuple[int, ...] | None = None  # a fused layer (passes/fuse_shared_input.py)


@dataclass
class Graphs:
    """The lowered graphs of one build: `onnx` = (ExportedProgram, DecoderSpec, pass report) or None; `relax` =
    {"prefill"|"decode": (ExportedProgram, DecoderSpec)}."""

    onnx: tuple | None = None
    relax: dict = field(default_factory=dict)


RELAX_FUNCTIONS = (("prefill", None), ("decode", 1))  # (function, fixed token count or None for any)


def supports_for(target: Target):
    """config → bool: the kernel table has kernels of this target's kind for it and the target accepts it (what
    `lower_aqlm_linear` checks)."""
    from aqlm_compile.kernels.registry import supports

    return lambda config: supports(config, target.kind) and target.accepts_config(config) is None


def export_graphs(model, routes, options: BuildOptions, supports=None, relax_fuse: bool = False) -> Graphs:
    """Export (once each) and lower the graphs the `routes` need from a loaded checkpoint `model` (changed in place:
    traced as the op dialect, its dense weights kept fp16 as stored or the head as int8 rows, `options.head`, for
    both routes; the ONNX route's fp16 head traced as one op, export.dense_ops_for_onnx). `relax_fuse`:
    the Relax route fuses q/k/v and gate/up too, their parameters concatenated once here (`--fuse-tvm`: CPU
    targets only, whose every kernel takes fused layers; the CUDA prefill decodes Ŵ in the graph, unfused)."""
    from aqlm_compile.export import (attention_ops_for_onnx, compact_embedding, dense_ops_for_onnx, export_decoder,
                                     keep_dense_fp16, keep_head_int8, prepare_for_export, scales_for_kernels)
    from aqlm_compile.passes.pipeline import PipelineOptions, run_pipeline

    prepare_for_export(model)
    try:
        compact_embedding(model, options.embedding)  # before both routes: ONNX and TVM hold the same rows
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    graphs = Graphs()
    # both routes read the dense weights (embedding, lm_head) as the checkpoint stores them (fp16), or the head as
    # int8 rows (`--head int8`): the same values in ORT and in the TVM runtime
    keep_dense_fp16(model)
    if options.head == "int8":
        keep_head_int8(model)
    if "onnx" in routes:
        with dense_ops_for_onnx(model), attention_ops_for_onnx(model):
            ep, spec = export_decoder(model)
        report = run_pipeline(ep, dump_ir=options.dump_ir, options=PipelineOptions(
            supports=supports, name_prefix=DECODER_PREFIX, fuse=options.fuse))
        graphs.onnx = (ep, spec, report)
    if "tvm" in routes:
        # after the ONNX export: that graph holds the tensors it was traced with; these read the scales as the
        # kernels take them
        scales_for_kernels(model)
        for name, tokens in RELAX_FUNCTIONS:
            ep, spec = export_decoder(model, tokens)
            run_pipeline(ep, options=PipelineOptions(supports=supports, name_prefix=DECODER_PREFIX, fuse=relax_fuse,
                                                     fold_cats=relax_fuse))
            graphs.relax[name] = (ep, spec)
    return graphs


def relax_graphs(ckpt_dir, supports=None, fuse: bool = False) -> dict:
    """The Relax route's lowered `prefill`/`decode` graphs of a checkpoint (a tool for tests; `fuse`: as
    `build --fuse-tvm` makes them)."""
    from aqlm_compile import format as fmt

    model, _, _ = fmt.load(ckpt_dir)
    return export_graphs(model, ("tvm",), BuildOptions(), supports, relax_fuse=fuse).relax


def kernel_requests(layers: dict, aqlm_config: AqlmConfig, graphs: Graphs) -> list[KernelRequest]:
    """Every checkpoint layer (`layers` {name: (out, in, AqlmConfig)}, unfused) and every `aqlm_gemm` node of the
    lowered graphs, each (shape, config) once."""
    import torch

    from aqlm_compile.ops import gemm_layer  # (importing ops registers torch.ops.aqlm)

    found = {(o, i, None, c.name): KernelRequest(o, i, c) for o, i, c in layers.values()}
    eps = ([graphs.onnx[0]] if graphs.onnx else []) + [ep for ep, _ in graphs.relax.values()]
    for ep in eps:
        for node in ep.graph_module.graph.nodes:
            if node.target is torch.ops.aqlm.aqlm_gemm.default:
                g = gemm_layer(node)
                parts = g.partitions if g.partitions and len(g.partitions) > 1 else None
                key = (g.out_features, g.in_features, parts, g.config.name)
                found.setdefault(key, KernelRequest(g.out_features, g.in_features, g.config, parts))
    return [found[k] for k in sorted(found, key=lambda k: (k[0], k[1], k[2] or (), k[3]))]


def dense_requests(graphs: Graphs) -> list[tuple[int, int, str]]:
    """(out, in, weight dtype) of every dense layer the ONNX route hands to the op library (`aqlm.linear_f16`,
    `aqlm.linear_rows_int8` → `aqlm.DenseMatMul`): the kernel library gets a kernels/dense.py kernel for each."""
    import torch

    import aqlm_compile.ops  # noqa: F401  (registers torch.ops.aqlm)

    if graphs.onnx is None:
        return []
    found = set()
    for node in graphs.onnx[0].graph_module.graph.nodes:
        if node.target in (torch.ops.aqlm.linear_f16.default, torch.ops.aqlm.linear_rows_int8.default):
            w = node.args[1].meta["val"]
            found.add((int(w.shape[0]), int(w.shape[1]), str(w.dtype).replace("torch.", "")))
    return sorted(found)


def attention_requests(graphs: Graphs, options: BuildOptions, target: Target) -> list[tuple[int, int, int, float]]:
    """(heads, kv heads, head dim, scale) of every `aqlm.gqa_attention` node of the ONNX route when its ONNX model
    runs them as `aqlm.GroupQueryAttention` (`--ort-attention aqlm`, CPU targets): the kernel library gets the
    three kernels of each (kernel_abi.attention_symbols)."""
    import torch

    import aqlm_compile.ops  # noqa: F401  (registers torch.ops.aqlm)

    if graphs.onnx is None or not ort_attention_is_ours(options, target):
        return []
    found = set()
    for node in graphs.onnx[0].graph_module.graph.nodes:
        if node.target is torch.ops.aqlm.gqa_attention.default:
            heads, kv_heads, scale = (node.args[i] for i in (8, 9, 10))
            head_dim = int(node.args[3].meta["val"].shape[3])
            found.add((int(heads), int(kv_heads), head_dim, float(scale)))
    return sorted(found)


def silu_mul_requests(graphs: Graphs) -> list[int]:
    """The half widths F of every split of a tensor into two equal halves along its last axis in the ONNX route's
    graph (`aten.split_with_sizes`, `aten.split`): the gated MLP over a fused gate/up output is one of them. The
    kernel library gets kernels/elementwise.py `silu_mul_halves` for each, and export_onnx rewrites only the gated
    MLPs of these widths into `aqlm.SiluMulHalves` (passes/silu_mul_halves_for_ort.py), so every such node has its
    kernels."""
    import torch

    if graphs.onnx is None:
        return []
    aten = torch.ops.aten
    found = set()
    for node in graphs.onnx[0].graph_module.graph.nodes:
        if node.target not in (aten.split_with_sizes.default, aten.split.Tensor):
            continue
        val = node.args[0].meta.get("val")
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
        if val is None or dim not in (-1, val.dim() - 1):
            continue
        width = val.shape[-1]
        sizes = node.args[1]
        if isinstance(sizes, int):
            sizes = [sizes] * (width // sizes) if isinstance(width, int) and width % sizes == 0 else []
        if len(sizes) == 2 and sizes[0] == sizes[1] and isinstance(sizes[0], int):
            found.add(int(sizes[0]))
    return sorted(found)


def ort_attention_is_ours(options: BuildOptions, target: Target) -> bool:
    """Whether the ONNX route's attention runs as the op library's `aqlm.GroupQueryAttention` (TVM kernels) rather
    than ORT's own `com.microsoft.GroupQueryAttention`: `--ort-attention aqlm` on a CPU target (a GPU target's
    kernel library holds no CPU kernels)."""
    return options.ort_attention == "aqlm" and target.device == "cpu"


def _layers(model) -> dict:
    from aqlm_compile import format as fmt

    return {name: (m.out_features, m.in_features, m.config) for name, m in fmt.quantized_modules(model).items()}


def _check_options(target: Target, options: BuildOptions) -> None:
    from aqlm_compile.kernels.registry import MAX_GEMV_BATCH

    if options.fuse_tvm and target.device != "cpu":
        raise ConfigError(f"--fuse-tvm: CPU targets only (the {target.name} prefill decodes Ŵ in the graph, unfused)")
    if options.ort_attention not in ("aqlm", "ort"):
        raise ConfigError(f"--ort-attention {options.ort_attention!r}: expected aqlm or ort")
    if options.head not in (None, "fp16", "int8"):
        raise ConfigError(f"--head {options.head!r}: expected fp16 or int8")
    if options.head == "int8" and target.device != "cpu":
        raise ConfigError(f"--head int8: CPU targets only (the int8 head kernel, kernels/dense.py, is CPU-scheduled); "
                          f"--target {target.name} keeps the head fp16")
    from aqlm_compile.export import EMBEDDINGS

    if options.embedding not in EMBEDDINGS:
        raise ConfigError(f"--embedding {options.embedding!r}: expected one of {', '.join(EMBEDDINGS)}")
    if not 1 <= options.max_batch <= MAX_GEMV_BATCH:
        raise ConfigError(f"--max-batch {options.max_batch}: expected 1..{MAX_GEMV_BATCH}")
    if options.dense_model_dir is not None and not target.dense_baseline:
        raise ConfigError(f"--dense/--dense-model: target {target.name} has no dense baseline")
    target.check(options)


def build(checkpoint, target: str | Target, options: BuildOptions | None = None, out_dir=None) -> dict:
    """Build `checkpoint` for `target` into `out_dir` (default `<checkpoint>-<target>`); returns the manifest."""
    from aqlm_compile import format as fmt

    from . import common  # noqa: F401  (sizes TVM's thread pool before anything starts TVM)

    target = get_target(target) if isinstance(target, str) else target
    options = options or BuildOptions()
    out_dir = Path(out_dir or f"{str(checkpoint).rstrip('/')}-{target.name}")
    _check_options(target, options)
    if options.fuse_tvm is None:
        options = replace(options, fuse_tvm=target.fuse_tvm_default)
    toolchain = target.toolchain(options)
    routes = [r for r in target.routes if getattr(options, r)]
    model, aqlm_config, meta = fmt.load(checkpoint)  # the one load + validation of this build
    if options.head is None:
        from aqlm_compile.embedding import default_head

        options = replace(options, head=default_head(model, meta.get("dense_head"), target.device))
    layers = _layers(model)
    graphs = export_graphs(model, routes, options, supports_for(target), relax_fuse=options.fuse_tvm)
    del model

    from .common import cpu_features, kernel_features, kernel_library, tvm, write_artifact

    tvm_target = target.tvm_target(options)
    halves = silu_mul_requests(graphs)  # the same widths for the kernel library and export_onnx's rewrite
    mod, kernels = kernel_library(kernel_requests(layers, aqlm_config, graphs), target.kind, options.max_batch,
                                  kernel_features(tvm_target, options.prefill), artifact_config=aqlm_config,
                                  dense=dense_requests(graphs), attention=attention_requests(graphs, options, target),
                                  silu_mul=halves)
    with target.compile_context(options), tvm_target:
        lib = tvm.compile(mod, target=tvm_target)
    lib_name = f"kernels_{target.name}.so"

    def export_lib(path: Path, module=None):
        (module or lib).export_library(str(path), **({"fcompile": toolchain.fcompile} if toolchain.fcompile else {}))
        if target.check_library is not None:
            target.check_library(path, options)  # before the artifact is renamed into place

    extra, steps = dict(toolchain.manifest), []
    extra["cpu_features"] = cpu_features(tvm_target, target.arch(options))  # artifact.check_cpu_features
    extra["embedding"] = options.embedding  # embedding.compact_embedding: how both routes read the input embedding
    extra["head"] = options.head  # fp16 | int8: how both routes store a dense lm_head (embedding.default_head)
    extra["prefill"] = options.prefill  # int8 | fp32: whether the prompt GEMMs may quantize their activations
    if graphs.onnx is not None:
        steps += _onnx_route(target, options, toolchain, graphs.onnx, lib_name, extra, halves)
    if graphs.relax:
        steps.append(_relax_route(target, options, graphs.relax, tvm_target, export_lib, extra))
    return write_artifact(checkpoint, out_dir, target_name=target.name, arch=target.arch(options),
                          target_spec=target.target_spec(tvm_target, options), lib_name=lib_name,
                          export=export_lib, aqlm_config=aqlm_config, layers=layers, kernels=kernels,
                          extra_steps=steps, extra_manifest=extra, extra_files=toolchain.files)


def _onnx_route(target: Target, options: BuildOptions, toolchain, onnx_graph, lib_name: str, extra: dict,
                silu_mul_halves=()) -> list:
    """The ONNX decoder (AqlmMatMul nodes), its portable twin, the dense ONNX baseline, the ORT op library."""
    from .onnx import onnx_route
    from .ort import LIBRARY, build_ort_library

    dense_dir = options.dense_model_dir if options.onnx_dense else None
    populate, entry = onnx_route(*onnx_graph, dense_model_dir=dense_dir, external_data=options.onnx_external_data,
                                 attention="aqlm" if ort_attention_is_ours(options, target) else "ort",
                                 silu_mul_halves=silu_mul_halves)
    entry["op_library"] = LIBRARY
    extra["onnx"] = entry
    return [populate, lambda tmp: build_ort_library(tmp, lib_name, toolchain.runtime_libs, cxx=toolchain.cxx)]


def _relax_route(target: Target, options: BuildOptions, relax: dict, tvm_target, export_lib, extra: dict):
    """The whole model for the Relax VM (+ the dense FP32/FP16 baselines through the same compiler)."""
    from .common import kernel_features
    from .relax import compile_relax_model, dense_relax_graphs, relax_decoder_module

    extra["tvm"] = {}  # filled by the step, before the manifest is written

    def step(tmp: Path):
        def export_model(ex, path: Path):
            export_lib(path, ex)

        compile_ctx = target.compile_context(options)
        entry = compile_relax_model(relax_decoder_module(relax, device=target.device, target_kind=target.kind,
                                                         features=kernel_features(tvm_target, options.prefill)),
                                    tmp, tvm_target, f"model_{target.name}.so", export=export_model,
                                    compile_context=compile_ctx)
        entry["head"] = {"fp16": "fp16 (as stored)", "int8": "int8 rows, fp32 scale per row"}[options.head]
        if target.runner:
            entry["runner"] = target.runner
        if target.device != "cpu":
            entry["device"] = target.device
        if options.dense_model_dir is not None:
            for key, dtype, lib, params in (("dense", "float32", "model_dense", "model_dense_params.bin"),
                                            ("dense_fp16", "float16", "model_dense16", "model_dense16_params.bin")):
                if dtype in options.dense_dtypes:
                    graphs = dense_relax_graphs(options.dense_model_dir, fp16=dtype == "float16")
                    entry[key] = compile_relax_model(
                        relax_decoder_module(graphs, device=target.device, target_kind=target.kind,
                                             features=kernel_features(tvm_target, options.prefill)), tmp,
                        tvm_target, f"{lib}_{target.name}.so", export=export_model, params_name=params,
                        compile_context=target.compile_context(options))
        extra["tvm"].update(entry)

    return step

