"""Pick a kernel for (config, target, batch), recording why."""

from __future__ import annotations

from dataclasses import dataclass

from aqlm_compile.errors import ConfigError

from .gemv_direct import GemvShape, gemv_direct

MAX_GEMV_BATCH = 8


@dataclass(frozen=True)
class KernelChoice:
    name: str
    reason: str
    builder: object

    def build_func(self, shape: GemvShape, symbol: str):
        return self.builder(shape, name=symbol)


def select_kernel(shape: GemvShape, target_kind: str) -> KernelChoice:
    if target_kind != "llvm":
        raise ConfigError(f"target {target_kind!r}: no AQLM kernel yet (CPU llvm targets only so far)")
    if shape.batch > MAX_GEMV_BATCH:
        raise ConfigError(f"batch {shape.batch}: the GEMV kernel covers 1..{MAX_GEMV_BATCH} tokens; "
                          "the prefill GEMM kernel is not built yet")
    return KernelChoice("gemv_direct", "batch ≤ 8 on CPU: direct decode, codebooks stay in L1/L2", gemv_direct)
