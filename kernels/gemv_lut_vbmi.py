"""Byte-permute lookup-table AQLM GEMV for x86 CPUs with AVX-512 VBMI (decode, batch 1–8), for 8-bit codes (Kx8).

The T-MAC route (Wei et al. 2024) applied to AQLM's 256-entry codebooks. Two phases in one call:

1. The table. For every input group j, codebook m and token n, the 256 partial dot products
   t[n, j, m, k] = C_m[k] · x[n, j·g:(j+1)·g] (fp32, vectorised over k from a transposed fp32 copy of the
   codebooks), quantized to int8 with one scale per token per block of `group_block` input groups
   (scale = max |t| over the block / 127, round to nearest). A block is a thread-pool task.
2. The lookups. Rows go in tiles of 64 (one zmm register of int8 codes): for each input group and codebook the 64
   codes of a tile are one 64-byte load, and `vpermi2b` looks 64 rows up at once in a 128-entry half of the
   table (two registers); the code's top bit picks the half (codes are stored signed: code ≥ 128 ⇔ byte < 0).
   The int8 partial sums accumulate in int16 over a block (≤ 2·127·M per group: a block of up to 128/M groups
   cannot overflow), then in fp32 times the block's scale; y = scale[o] · acc (+ bias).

Four instructions per 64 rows × g weights × codebook, so the kernel streams its codes at memory speed
(4096² 2x8g8: 0.28 ms against 0.99 ms for `gemv_direct`, Zen 4, 2 threads); the table costs M·K·g
multiply-adds per input group, which is why small layers (out ≲ 256) stay on the direct kernel (kernels.registry).

Codes layout: ROW_TILED, codes[out/64, in/g, M, 64] — the 64 rows of a tile for one (group, codebook) contiguous —
stored in a tensor of the HF shape [out, in/g, M] (`to_row_tiled`, done once at build time), so the tensor keeps its
shape and dtype through the graph and only its byte order changes. `gemm_decode` reads the same layout, so the
prefill and decode functions share one copy of the codes.

Accuracy: the int8 table is an approximation (0.7–1% relative error per layer output on random data, the int8
rounding floor); the fp32 kernels stay the reference and the decode PPL of both is measured
(benchmarks/lut_decode_ppl.py).
"""

from __future__ import annotations

import numpy as np
from tvm.script import tirx as T

from .gemv_direct import GemvShape, _largest_divisor

ROW_TILED = "row_tiled64"
TILE_ROWS = 64
REQUIRED_FEATURES = ("avx512bw", "avx512vbmi")


def to_row_tiled(codes: np.ndarray) -> np.ndarray:
    """HF codes [out, in/g, M] → the same shape holding [out/64, in/g, M, 64] (rows of a tile innermost)."""
    if codes.ndim != 3 or codes.shape[0] % TILE_ROWS:
        raise ValueError(f"codes: expected [out, in/g, M] with out a multiple of {TILE_ROWS}, found shape "
                         f"{list(codes.shape)}")
    o, j, m = codes.shape
    return np.ascontiguousarray(codes.reshape(o // TILE_ROWS, TILE_ROWS, j, m).transpose(0, 2, 3, 1)).reshape(o, j, m)


def from_row_tiled(codes: np.ndarray) -> np.ndarray:
    """The inverse of `to_row_tiled`."""
    o, j, m = codes.shape
    return np.ascontiguousarray(codes.reshape(o // TILE_ROWS, j, m, TILE_ROWS).transpose(0, 3, 1, 2)).reshape(o, j, m)


def unsupported(shape: GemvShape) -> str | None:
    """None when the kernel can compute `shape`, else why not (CPU features and codes layout are the kernel
    table's to check; whether it is the fastest kernel there is `pays_off`)."""
    cfg = shape.config
    if cfg.codebook_size != 256:
        return f"codebooks of {cfg.codebook_size} entries: the byte-permute table holds 256"
    if cfg.out_group_size != 1:
        return "out_group_size > 1"
    if shape.out_features % TILE_ROWS or shape.row_quantum < TILE_ROWS:
        return f"rows (or a fused partition) not a multiple of {TILE_ROWS}"
    if cfg.num_codebooks > 8:
        return "more than 8 codebooks: the int16 block sums could overflow"
    return None


def pays_off(shape: GemvShape) -> str | None:
    """None when the kernel beats `gemv_direct` at `shape`, else why not. The table costs M·256·g multiply-adds per
    input group whatever the row count; the direct kernel about a cycle per row, group and codebook. Measured (Zen 4
    VM, 2 threads, LUT vs direct): 576×576 14.9 vs 11.9 µs (direct wins), 1536×576 16.7 vs 28.3, 576×1536 25.1 vs
    28.9, 4096² 140 vs 496, 11008×4096 339 vs 1350."""
    rows = shape.out_features // len(shape.parts)  # one table per partition
    if rows >= 768 or (rows >= 256 and shape.in_features >= 1024):
        return None
    return f"{rows} rows per table × {shape.in_features} inputs: the table costs more than the lookups save"


def gemv_lut_vbmi(shape: GemvShape, group_block: int = 4, chunks: int = 8, name: str = "aqlm_gemv_lut_vbmi"):
    """A TIR PrimFunc `name(x[N, I], codes[O, I/g, M] (ROW_TILED bytes), codebooks[P·M, 256, g], scales[O],
    bias[O], y[N, O])`.

    Split over the input dimension: the input groups are cut into `chunks` (the largest divisor of the scale
    blocks not above it), one thread-pool task each. A task builds the table of its own groups only (it stays in
    L1: 4096 inputs / 8 chunks = 32 KiB), looks up every row tile over those groups, and writes its partial sums;
    the partials are added (times the row scales, plus bias) at the end. Split over rows instead, every thread
    needs the whole table, which then crosses between cores and is re-read from L2 per row tile (measured on the
    2-vCPU Zen 4 VM: 4096² 0.21 vs 0.14 ms, 576×1536 51 vs 24 µs). `group_block`: input groups sharing one table
    scale (the largest divisor of I/g not above it)."""
    cfg = shape.config
    O, I, N, g, M = shape.out_features, shape.in_features, shape.batch, cfg.in_group_size, cfg.num_codebooks
    cfg.check_shape(O, I)
    why = unsupported(shape)
    if why:
        raise ValueError(f"gemv_lut_vbmi {O}x{I} {cfg.name}: {why}")
    J, K, TR, KV = I // g, 256, TILE_ROWS, 16
    JB = _largest_divisor(J, min(group_block, 128 // M))  # groups per table scale
    NBLK = J // JB
    C = _largest_divisor(NBLK, chunks)  # thread-pool tasks
    BC = NBLK // C  # scale blocks per task
    JC = BC * JB  # input groups per task
    PM = shape.codebook_rows()
    act, cbt_dtype = shape.act_dtype, shape.codebook_dtype

    @T.prim_func
    def kernel(x: T.Buffer((N, I), act), codes: T.Buffer((O, J, M), "int8"), cb: T.Buffer((PM, K, g), cbt_dtype),
               scales: T.Buffer((O,), "float32"), bias: T.Buffer((O,), "float32"), y: T.Buffer((N, O), act)):
        T.func_attr({"global_symbol": name, "tirx.noalias": True})
        tiles = T.decl_buffer((O // TR, J, M, TR), "int8", data=codes.data)
        partial = T.alloc_buffer((C, N, O), "float32", scope="global")
        cbt = T.alloc_buffer((PM, g, K), "float32", scope="global")
        for pm, k, t in T.grid(PM, K, g):
            cbt[pm, t, k] = T.Cast("float32", cb[pm, k, t])
        for c in T.parallel(C):
            table = T.alloc_buffer((N, JC, PM, K), "int8", scope="global")
            table_scale = T.alloc_buffer((N, BC), "float32", scope="global")
            tf = T.alloc_buffer((JB, PM, K), "float32", scope="global")
            peak = T.alloc_buffer((KV,), "float32", scope="global")
            s = T.alloc_buffer((1,), "float32", scope="global")
            for n, bb in T.grid(N, BC):  # the table of this task's groups, one scale per block of JB groups
                for v in T.vectorized(KV):
                    peak[v] = T.float32(0)
                for jj, pm in T.grid(JB, PM):
                    for ko in range(K // KV):
                        for v in T.vectorized(KV):
                            tf[jj, pm, ko * KV + v] = T.float32(0)
                        for t in range(g):
                            for v in T.vectorized(KV):
                                tf[jj, pm, ko * KV + v] = tf[jj, pm, ko * KV + v] + cbt[pm, t, ko * KV + v] * \
                                    T.Cast("float32", x[n, (c * JC + bb * JB + jj) * g + t])
                        for v in T.vectorized(KV):
                            peak[v] = T.max(peak[v], T.fabs(tf[jj, pm, ko * KV + v]))
                s[0] = T.float32(1e-30)  # an all-zero block: any scale, the table is zeros
                for v in range(KV):
                    s[0] = T.max(s[0], peak[v])
                table_scale[n, bb] = s[0] / T.float32(127)
                for jj, pm in T.grid(JB, PM):
                    for k in T.vectorized(K):
                        table[n, bb * JB + jj, pm, k] = T.Cast(
                            "int8", T.nearbyint(tf[jj, pm, k] * (T.float32(127) / s[0])))
            for ob in range(O // TR):  # every row tile over this task's groups
                acc = T.alloc_buffer((N, TR), "float32", scope="global")
                part = T.alloc_buffer((N, TR), "int16", scope="global")
                for n in range(N):
                    for r in T.vectorized(TR):
                        acc[n, r] = T.float32(0)
                for bb in range(BC):
                    for n in range(N):
                        for r in T.vectorized(TR):
                            part[n, r] = T.int16(0)
                    for jj in range(JB):
                        for m in T.unroll(M):
                            for n in range(N):
                                idx = tiles[ob, c * JC + bb * JB + jj, m, T.ramp(0, 1, TR)]
                                pm = shape.partition_of(ob * TR) * M + m
                                low = T.call_llvm_pure_intrin(
                                    "int8x64", "llvm.x86.avx512.vpermi2var.qi.512",
                                    table[n, bb * JB + jj, pm, T.ramp(0, 1, 64)], idx,
                                    table[n, bb * JB + jj, pm, T.ramp(64, 1, 64)])
                                high = T.call_llvm_pure_intrin(
                                    "int8x64", "llvm.x86.avx512.vpermi2var.qi.512",
                                    table[n, bb * JB + jj, pm, T.ramp(128, 1, 64)], idx,
                                    table[n, bb * JB + jj, pm, T.ramp(192, 1, 64)])
                                part[n, T.ramp(0, 1, TR)] = part[n, T.ramp(0, 1, TR)] + T.Cast(
                                    "int16x64", T.Select(idx < T.Broadcast(T.int8(0), TR), high, low))
                    for n in range(N):
                        for r in T.vectorized(TR):
                            acc[n, r] = acc[n, r] + T.Cast("float32", part[n, r]) * table_scale[n, bb]
                for n in range(N):
                    for r in T.vectorized(TR):
                        partial[c, n, ob * TR + r] = acc[n, r]
        total = T.alloc_buffer((KV,), "float32", scope="global")
        for n, oo in T.grid(N, O // KV):
            for v in T.vectorized(KV):
                total[v] = partial[0, n, oo * KV + v]
            for c in range(1, C):
                for v in T.vectorized(KV):
                    total[v] = total[v] + partial[c, n, oo * KV + v]
            for v in T.vectorized(KV):
                y[n, oo * KV + v] = T.Cast(act, total[v] * scales[oo * KV + v] + bias[oo * KV + v])

    return kernel
