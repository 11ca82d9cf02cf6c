"""x86-64 CPU target: LLVM for the host CPU or a named one; the TVM thread pool size is set explicitly."""

from __future__ import annotations

import os

# The pool defaults to half the hardware threads (1 on a 2-vCPU VM: facts doc G2); set it before TVM starts it.
os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))

import tvm  # noqa: E402

from aqlm_compile.errors import ConfigError  # noqa: E402

NAMED_CPUS = {"avx2": "haswell", "avx512": "skylake-avx512", "znver3": "znver3", "znver4": "znver4"}


def host_cpu() -> str:
    return tvm.target.codegen.llvm_get_system_cpu()


def x86_target(cpu: str | None = None) -> tvm.target.Target:
    """`cpu`: None for the host, or avx2 / avx512 / an LLVM CPU name (never "native": G1)."""
    if cpu is None:
        mcpu = host_cpu()
    else:
        mcpu = NAMED_CPUS.get(cpu, cpu)
        if mcpu == "native":
            raise ConfigError("--cpu native: name the CPU (e.g. znver4, skylake-avx512) or leave it out for the host")
    return tvm.target.Target({"kind": "llvm", "mcpu": mcpu, "mtriple": "x86_64-linux-gnu"})


def build(prim_func, target: tvm.target.Target):
    return tvm.compile(prim_func, target=target)
