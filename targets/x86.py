"""x86-64 CPU target: LLVM for the host CPU or a named one. Registered in targets/registry.py's table; the build
itself is targets/plan.py's. Builds on an x86-64 machine only (its ORT op library links the host's TVM runtime)."""

from __future__ import annotations

import platform

from aqlm_compile.errors import ConfigError

from .registry import BuildOptions, Target, Toolchain, register_target

NAMED_CPUS = {"avx2": "haswell", "avx512": "skylake-avx512", "znver3": "znver3", "znver4": "znver4"}


def host_cpu() -> str:
    from .common import tvm

    return tvm.target.codegen.llvm_get_system_cpu()


def _mcpu(cpu: str | None) -> str:
    """`cpu`: None for the host, or avx2 / avx512 / an LLVM CPU name (never "native": docs/tvm-and-ort-notes.md
    N1)."""
    if cpu is None:
        return host_cpu()
    mcpu = NAMED_CPUS.get(cpu, cpu)
    if mcpu == "native":
        raise ConfigError("--cpu native: name the CPU (e.g. znver4, skylake-avx512) or leave it out for the host")
    return mcpu


def x86_target(cpu: str | None = None):
    from .common import tvm

    return tvm.target.Target({"kind": "llvm", "mcpu": _mcpu(cpu), "mtriple": "x86_64-linux-gnu"})


def _check(options: BuildOptions) -> None:
    if platform.machine() != "x86_64":
        raise ConfigError(f"--target x86: this machine is {platform.machine()}; cross-building x86 is not supported")
    _mcpu(options.cpu)


def _toolchain(options: BuildOptions) -> Toolchain:
    from .ort import host_runtime_libs

    return Toolchain(runtime_libs=host_runtime_libs() if options.onnx else {})


X86 = register_target(Target(
    name="x86", kind="llvm", summary="x86-64 CPU (this machine's CPU, or --cpu avx2|avx512|<LLVM name>)",
    tvm_target=lambda options: x86_target(options.cpu),
    arch=lambda options: "x86_64",
    target_spec=lambda t, options: {"kind": "llvm", "mcpu": str(t.attrs["mcpu"]), "mtriple": "x86_64-linux-gnu"},
    options=("cpu",), toolchain=_toolchain, check=_check, dense_baseline=True, fuse_tvm_default=True,
))


def build(prim_func, target):
    """One PrimFunc compiled for `target` (the kernel tests and `bench --kernels`; artifacts use targets/plan.py)."""
    from .common import tvm

    return tvm.compile(prim_func, target=target)
