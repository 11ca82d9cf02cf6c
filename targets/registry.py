"""Targets as data: one `Target` record per target family, in a registry the CLI and the build plan read.

A record says what the build plan (targets/plan.py) needs to know about a target and nothing else: the TVM
target it compiles for, the kernel-table kind it asks kernels of (kernels/registry.py: the kernels it can build
are that kind's specs, and the configs it supports are theirs, narrowed by `accepts_config`), the routes it can build
besides its kernel library (the ONNX decoder + ORT op library, the whole model for the TVM runtime's Relax VM), the
architecture runtimes check, its toolchain (cross compiler, runtime libraries and runners shipped in the artifact),
its checks before building and after (e.g. the CUDA device-code check) and which build options it reads.

A new target is one `register_target(Target(...))` in its own module plus its toolchain helpers; importing this
module registers the built-in ones (x86.py, arm64.py, cuda.py). No TVM import here: the CLI lists the targets
without starting the compiler.
"""

from __future__ import annotations

import contextlib
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from aqlm_compile.errors import ConfigError

BUILTIN_MODULES = ("aqlm_compile.targets.x86", "aqlm_compile.targets.arm64", "aqlm_compile.targets.cuda")
ROUTES = ("onnx", "tvm")


@dataclass(frozen=True)
class BuildOptions:
    """What `aqlm-compile build` was asked for. `cpu` and `archs`/`ptx_arch` are read only by targets that list them
    in `Target.options` (the CLI refuses them elsewhere)."""

    cpu: str | None = None  # CPU targets: an LLVM CPU name or alias (None: the target's default)
    archs: tuple[str, ...] | None = None  # GPU targets: device architectures (None: the target's default)
    ptx_arch: str | None = "compute_90"  # GPU targets: the PTX kept for newer devices (None: none)
    max_batch: int = 8  # largest token count with a GEMV kernel in the kernel library
    onnx: bool = True  # the ONNX route (where the target has it)
    tvm: bool = True  # the whole-model Relax VM route
    fuse: bool = True  # fuse layers sharing an input (ONNX route)
    fuse_tvm: bool | None = None  # the same in the Relax route (CPU targets); None: the target's `fuse_tvm_default`
    dump_ir: str | None = None  # write the ONNX route's graph before/after each pass here
    dense_model_dir: str | None = None  # also compile this FP model as the dense baseline (dense_baseline targets)
    dense_dtypes: tuple[str, ...] = ("float32", "float16")  # the baseline's stored weights in the TVM route
    onnx_dense: bool = True  # with dense_model_dir: also the dense ONNX model
    # the dense head (and a tied embedding), both routes: "fp16" as stored, or "int8" rows; None: the checkpoint's
    # recorded form, else int8 on CPU targets (embedding.default_head)
    head: str | None = None
    embedding: str = "stored"  # the input embedding, both routes: as stored, "int8" rows, or "head" (embedding.EMBEDDINGS)
    onnx_external_data: bool | None = None  # ONNX weights in model.onnx.data (None: past 1 GiB, targets/onnx.py)
    # CPU prompt GEMMs (batch > max_batch): "int8" lets the kernel table pick int8-activation kernels where the CPU
    # has them (kernels/gemm_vnni.py; its accuracy: benchmarks/int8_prefill_ppl.py), "fp32" keeps every prompt
    # product in fp32
    prefill: str = "int8"
    # the ONNX route's attention on CPU targets: "aqlm" = the op library's aqlm.GroupQueryAttention on the TVM kernels
    # of kernels/attention.py, "ort" = ONNX Runtime's com.microsoft.GroupQueryAttention (docs/tvm-and-ort-notes.md N33)
    ort_attention: str = "aqlm"


@dataclass
class Toolchain:
    """How a target's files are made and what ships with them, resolved once per build (`Target.toolchain`)."""

    fcompile: Callable | None = None  # export_library's fcompile (a cross compiler); None: TVM's default
    cxx: str = "g++"  # compiles the ORT op library
    runtime_libs: dict[str, Path] = field(default_factory=dict)  # TVM runtime libraries the op library links to
    files: dict[str, Path] = field(default_factory=dict)  # shipped as-is (executable), e.g. runtime/aqlm_vm_run
    manifest: dict = field(default_factory=dict)  # extra top-level manifest entries


@dataclass(frozen=True)
class Target:
    name: str  # --target NAME; also the file tag: kernels_<name>.so, model_<name>.so
    kind: str  # what it asks the kernel table for: "llvm" (CPU) or "cuda"
    summary: str  # one line for --help
    tvm_target: Callable[[BuildOptions], Any]  # the tvm.target.Target to compile for
    arch: Callable[[BuildOptions], str]  # manifest "arch": what a runtime checks before loading
    target_spec: Callable[[Any, BuildOptions], dict]  # manifest "target_spec" from the TVM target
    routes: tuple[str, ...] = ROUTES  # routes it can build besides the kernel library
    options: tuple[str, ...] = ()  # BuildOptions fields it reads among "cpu", "archs"
    toolchain: Callable[[BuildOptions], Toolchain] = lambda options: Toolchain()
    check: Callable[[BuildOptions], None] = lambda options: None  # before loading anything: host, tools, values
    check_library: Callable[[Path, BuildOptions], None] | None = None  # each built library, before it is kept
    compile_context: Callable[[BuildOptions], Any] = lambda options: contextlib.nullcontext()
    runner: str | None = None  # the whole-model runner shipped in the artifact (manifest tvm.runner)
    dense_baseline: bool = False  # can also compile an FP model as the same-run baseline
    # Which AQLM configs it takes, beyond what its kind's kernels run (kernels/registry.py `supports`): None when
    # it takes the config, else why not. The lowering pass reports every layer it refuses, by name.
    accepts_config: Callable[[Any], str | None] = lambda config: None
    # `build` without --fuse-tvm/--no-fuse-tvm: fuse q/k/v and gate/up in the Relax route too. Only where an
    # interleaved decode A/B favoured it (x86: docs/tvm-and-ort-notes.md N35); never on CUDA (plan refuses it).
    fuse_tvm_default: bool = False

    @property
    def device(self) -> str:
        return "cuda" if self.kind == "cuda" else "cpu"


TARGETS: dict[str, Target] = {}
_loaded = False


def register_target(target: Target, replace: bool = False) -> Target:
    if target.name in TARGETS and not replace:
        raise ConfigError(f"target {target.name!r}: already registered")
    bad = [r for r in target.routes if r not in ROUTES]
    if bad:
        raise ConfigError(f"target {target.name!r}: unknown routes {bad}; expected some of {', '.join(ROUTES)}")
    TARGETS[target.name] = target
    return target


def unregister_target(name: str) -> None:
    TARGETS.pop(name, None)


def _load_builtin() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for module in BUILTIN_MODULES:
            importlib.import_module(module)


def target_names() -> list[str]:
    _load_builtin()
    return list(TARGETS)


def get_target(name: str) -> Target:
    _load_builtin()
    if name not in TARGETS:
        raise ConfigError(f"--target {name!r}: expected one of {', '.join(TARGETS)}")
    return TARGETS[name]


def targets_with(predicate: Callable[[Target], bool]) -> list[str]:
    _load_builtin()
    return [name for name, t in TARGETS.items() if predicate(t)]
