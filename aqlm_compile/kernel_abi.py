"""The names of the compiled AQLM kernels: one place for the build (targets/) and the runtimes (no TVM needed).
The ORT op library (targets/ort_op/aqlm_ort_op.cc) builds the same names in C++: keep them in step."""

from __future__ import annotations


def _suffix(partitions) -> str:
    return "_p" + "-".join(str(p) for p in partitions) if partitions and len(partitions) > 1 else ""


def gemv_symbol(out_f: int, in_f: int, batch: int, partitions=None) -> str:
    """GEMV for exactly `batch` tokens."""
    return f"aqlm_gemv_{out_f}x{in_f}_b{batch}{_suffix(partitions)}"


def gemm_symbol(out_f: int, in_f: int, partitions=None) -> str:
    """GEMM for any token count."""
    return f"aqlm_gemm_{out_f}x{in_f}{_suffix(partitions)}"
