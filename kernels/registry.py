"""Pick a kernel for (config, target, batch), recording why. The rules come from measurements on Zen 4
(benchmarks/results/kernels-x86.md); where two kernels exist the faster one per config is kept."""

from __future__ import annotations

from dataclasses import dataclass

from aqlm_compile.errors import ConfigError

from .gemm_decode import gemm_decode
from .gemv_cuda import gemv_cuda
from .gemv_direct import L1_BYTES, GemvShape, gemv_direct
from .gemv_lut import GROUP_MAJOR, OUT_MAJOR, gemv_lut, gemv_lut_grouped

MAX_GEMV_BATCH = 8
TARGET_KINDS = ("llvm", "cuda")


@dataclass(frozen=True)
class KernelChoice:
    name: str
    reason: str
    builder: object
    code_layout: str = OUT_MAJOR  # which codes layout the kernel reads (gemv_lut.OUT_MAJOR / GROUP_MAJOR)

    def build_func(self, shape: GemvShape, symbol: str):
        return self.builder(shape, name=symbol)


def use_lut(shape: GemvShape) -> bool:
    """LUT when decoding is expensive — codebooks larger than L1 (8x8g32: 128 KiB) — and the table is cheap: at
    batch 1–2 only (lookups are per token: 8x8g32 batch 4 ran 5.4 ms LUT vs 3.2 ms direct), at most 256 codewords and M·K ≤ out (the table costs M·K·in vectorised multiply-adds per token, the GEMV out·in
    gathers: 8x8g32 at 4096² measured 0.93 ms LUT vs 2.5 ms direct)."""
    cfg = shape.config
    cb_bytes = cfg.num_codebooks * cfg.codebook_size * cfg.in_group_size * 2
    return shape.batch <= 2 and cfg.codebook_size <= 256 and cb_bytes > L1_BYTES and \
        cfg.num_codebooks * cfg.codebook_size <= shape.out_features


def select_kernel(shape: GemvShape, target_kind: str, code_layouts=(OUT_MAJOR,)) -> KernelChoice:
    """`code_layouts`: the codes layouts the caller can hand the kernel. The HF layout always; the group-major one
    where the caller repacks the codes once at load time (then the LUT kernel reads each code once)."""
    if target_kind not in TARGET_KINDS:
        raise ConfigError(f"target kind {target_kind!r}: expected one of {', '.join(TARGET_KINDS)}")
    if shape.batch < 1:
        raise ConfigError(f"batch {shape.batch}: expected ≥ 1")
    if target_kind == "cuda":
        if shape.batch > MAX_GEMV_BATCH:
            raise ConfigError(f"batch {shape.batch}: CUDA has the GEMV kernel only (1..{MAX_GEMV_BATCH} tokens); "
                              "a CUDA prefill GEMM is not built yet")
        return KernelChoice("gemv_cuda", "GPU: warp per row, codebooks in shared memory when ≤ 32 KiB", gemv_cuda)
    if shape.batch > MAX_GEMV_BATCH:
        return KernelChoice("gemm_decode", f"batch > {MAX_GEMV_BATCH}: decode a tile of Ŵ once, reuse it per token",
                            gemm_decode)
    if use_lut(shape) and GROUP_MAJOR in code_layouts:
        return KernelChoice("gemv_lut_grouped", "codebooks exceed L1: per-call table of codeword·input dot products; "
                            "group-major codes, read once", gemv_lut_grouped, GROUP_MAJOR)
    if use_lut(shape):
        return KernelChoice("gemv_lut", "codebooks exceed L1: per-call table of codeword·input dot products",
                            gemv_lut)
    return KernelChoice("gemv_direct", "direct decode, codebooks stay in L1/L2", gemv_direct)
