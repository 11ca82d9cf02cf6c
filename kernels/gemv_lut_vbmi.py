"""Byte-permute lookup-table AQLM GEMV for x86 CPUs with AVX-512 VBMI (decode, batch 1–8), for 8-bit codes (Kx8).

The T-MAC route (Wei et al. 2024) applied to AQLM's 256-entry codebooks. Per input group j, codebook m and token n,
the table holds the 256 partial dot products t[n, j, m, k] = C_m[k] · x[n, j·g:(j+1)·g] (fp32, vectorised over k
from a transposed fp32 copy of the codebooks), rounded to 16 bits with one scale per token per block of
`group_block` groups (scale = peak |t| over the block / 32767) and stored as two byte planes: the signed high byte
and the low byte. Rows go in tiles of 64 (one zmm register of int8 codes): for each group and codebook the 64
codes of a tile are one 64-byte load, and `vpermi2b` looks 64 rows up at once in a 128-entry half of a plane (two
registers); the code's top bit picks the half (codes are stored signed: code ≥ 128 ⇔ byte < 0). Each plane's bytes
add up in int16 over a block (no overflow: ≤ 255·M per group), then in fp32 as (Σhigh·256 + Σlow) × the block's
scale; y = scale[o] · Σ (+ bias).

Work is split over the input groups (see `gemv_lut_vbmi`). Measured on the 2-vCPU Zen 4 VM, 2 threads, 2x8g8
(benchmarks in the function docstrings): 4096² 0.22 ms against 0.54 for `gemv_direct`, 11008×4096 0.62 vs 1.59.

Why two planes: one int8 plane (`planes=1`) halves the lookups (4096² 0.13 ms) but its rounding (0.9% relative
error per layer output on random data) cost SmolLM2-135M 2x8g8 +1.1% held-out PPL and 7.5% of next-token argmaxes
when only its gate/up/down layers used it (benchmarks/lut_decode_ppl.py, 8 windows; the result file of the
two-plane table is the one in benchmarks/results). The two-plane table is within 1e-4 of fp32.

Codes layout: ROW_TILED, codes[out/64, in/g, M, 64] — the 64 rows of a tile for one (group, codebook) contiguous —
stored in a tensor of the HF shape [out, in/g, M] (`to_row_tiled`, done once at build time), so the tensor keeps its
shape and dtype through the graph and only its byte order changes. `gemm_decode` reads the same layout, so the
prefill and decode functions share one copy of the codes.
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


def gemv_lut_vbmi(shape: GemvShape, group_block: int = 4, chunks: int = 8, planes: int = 2,
                  prefetch: int = 1, name: str = "aqlm_gemv_lut_vbmi"):
    """A TIR PrimFunc `name(x[N, I], codes[O, I/g, M] (ROW_TILED bytes), codebooks[P·M, 256, g], scales[O],
    bias[O], y[N, O])`.

    Split over the input dimension: the input groups are cut into `chunks` (the largest divisor of the scale
    blocks not above it), one thread-pool task each. A task builds the table of its own groups only (it stays in
    L1: 4096 inputs / 8 chunks = 32 KiB), looks up every row tile over those groups, and writes its partial sums;
    the partials are added (times the row scales, plus bias) at the end. Split over rows instead, every thread
    needs the whole table, which then crosses between cores and is re-read from L2 per row tile (measured on the
    2-vCPU Zen 4 VM: 4096² 0.21 vs 0.14 ms, 576×1536 51 vs 24 µs). `group_block`: input groups sharing one table
    scale (the largest divisor of I/g not above it). `prefetch`: software-prefetch each 64-byte line of codes this
    many row tiles ahead (a task reads one 64·M·groups-byte run per tile, jumping between runs, which the hardware
    prefetcher follows late; with weights from DRAM, 11008×4096 1.23 → 0.86 ms and 4096² 0.47 → 0.34 ms; 0: off)."""
    cfg = shape.config
    O, I, N, g, M = shape.out_features, shape.in_features, shape.batch, cfg.in_group_size, cfg.num_codebooks
    cfg.check_shape(O, I)
    why = unsupported(shape)
    if why:
        raise ValueError(f"gemv_lut_vbmi {O}x{I} {cfg.name}: {why}")
    J, K, TR, KV = I // g, 256, TILE_ROWS, 16
    if planes not in (1, 2):
        raise ValueError(f"planes {planes}: expected 1 (int8 table) or 2 (16-bit table as two byte planes)")
    QMAX = 127 if planes == 1 else 32767
    # int16 block sums must not overflow: a byte lookup is ≤ 255 in magnitude, M of them per group
    JB = _largest_divisor(J, min(group_block, 32767 // (255 * M)))  # groups per table scale
    NBLK = J // JB
    C = _largest_divisor(NBLK, chunks)  # thread-pool tasks
    BC = NBLK // C  # scale blocks per task
    JC = BC * JB  # input groups per task
    PM = shape.codebook_rows()
    act, cbt_dtype = shape.act_dtype, shape.codebook_dtype

    @T.macro
    def quantize(table, tf, n, j, jj, pm, k, inv_scale):
        """table[·, n, j, pm, k] = round(tf · inv_scale): one int8 plane, or the high (signed) and low byte of an
        int16 (the low byte's bits stored in an int8, zero-extended when looked up)."""
        if planes == 1:
            table[0, n, j, pm, k] = T.Cast("int8", T.Cast("int32", T.nearbyint(tf[jj, pm, k] * inv_scale)))
        else:
            table[0, n, j, pm, k] = T.Cast("int8", T.shift_right(
                T.Cast("int32", T.nearbyint(tf[jj, pm, k] * inv_scale)), 8))
            table[1, n, j, pm, k] = T.Cast("int8", T.bitwise_and(
                T.Cast("int32", T.nearbyint(tf[jj, pm, k] * inv_scale)), 255))

    def lookup(table, q, n, j, pm, idx):
        """64 bytes of plane q, entry idx[r] for each row r: vpermi2b in each 128-entry half, the top bit picks."""
        low = T.call_llvm_pure_intrin("int8x64", "llvm.x86.avx512.vpermi2var.qi.512",
                                      table[q, n, j, pm, T.ramp(0, 1, 64)], idx, table[q, n, j, pm, T.ramp(64, 1, 64)])
        high = T.call_llvm_pure_intrin("int8x64", "llvm.x86.avx512.vpermi2var.qi.512",
                                       table[q, n, j, pm, T.ramp(128, 1, 64)], idx,
                                       table[q, n, j, pm, T.ramp(192, 1, 64)])
        return T.Select(idx < T.Broadcast(T.int8(0), TR), high, low)

    def widen(q, v):  # sign-extend the high plane, zero-extend the low one
        w = T.Cast("int16x64", v)
        return w if q == 0 else T.bitwise_and(w, T.Broadcast(T.int16(255), TR))

    def combine(part, n, r):
        if planes == 1:
            return T.Cast("float32", part[0, n, r])
        return T.Cast("float32", part[0, n, r]) * T.float32(256) + T.Cast("float32", part[1, n, r])

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
            table = T.alloc_buffer((planes, N, JC, PM, K), "int8", scope="global")
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
                table_scale[n, bb] = s[0] / T.float32(QMAX)
                for jj, pm in T.grid(JB, PM):
                    for k in T.vectorized(K):
                        quantize(table, tf, n, bb * JB + jj, jj, pm, k, T.float32(QMAX) / s[0])
            for ob in range(O // TR):  # every row tile over this task's groups
                acc = T.alloc_buffer((N, TR), "float32", scope="global")
                part = T.alloc_buffer((planes, N, TR), "int16", scope="global")
                for n in range(N):
                    for r in T.vectorized(TR):
                        acc[n, r] = T.float32(0)
                for bb in range(BC):
                    for q, n in T.grid(planes, N):
                        for r in T.vectorized(TR):
                            part[q, n, r] = T.int16(0)
                    for jj in range(JB):
                        for m in T.unroll(M):
                            for n in range(N):
                                if prefetch > 0:  # the same line of the tile `prefetch` ahead
                                    T.evaluate(T.call_llvm_intrin("void", "llvm.prefetch.p0", T.address_of(
                                        tiles[T.min(ob + prefetch, O // TR - 1), c * JC + bb * JB + jj, m, 0]),
                                        T.int32(0), T.int32(3), T.int32(1)))
                                # the codes and codebook row are passed as expressions, not bound to names: bound
                                # (a TIR let), the codes vector was stored to the stack at every use (seen in the
                                # generated assembly; ≈ 2% of the kernel, hand-measured)
                                part[0, n, T.ramp(0, 1, TR)] = part[0, n, T.ramp(0, 1, TR)] + widen(
                                    0, lookup(table, 0, n, bb * JB + jj, shape.partition_of(ob * TR) * M + m,
                                              tiles[ob, c * JC + bb * JB + jj, m, T.ramp(0, 1, TR)]))
                                if planes == 2:
                                    part[1, n, T.ramp(0, 1, TR)] = part[1, n, T.ramp(0, 1, TR)] + widen(
                                        1, lookup(table, 1, n, bb * JB + jj, shape.partition_of(ob * TR) * M + m,
                                                  tiles[ob, c * JC + bb * JB + jj, m, T.ramp(0, 1, TR)]))
                    for n in range(N):
                        for r in T.vectorized(TR):
                            acc[n, r] = acc[n, r] + combine(part, n, r) * table_scale[n, bb]
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
