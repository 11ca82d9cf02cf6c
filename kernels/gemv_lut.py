"""Lookup-table AQLM GEMV for CPUs (decode, batch 1–8), for small codebooks (Kx8 and the like).

Two phases in one call:
1. table[n, j, m, k] = C_m[k] · x[n, j·g:(j+1)·g] — every codeword's partial dot product with every input group
   (N·M·K·I multiply-adds, a fraction of the GEMV's N·O·I when O ≫ M·K), vectorised over k from a transposed fp32
   copy of the codebooks; parallel over input groups.
2. y[n, o] = scale[o] · Σ_j Σ_m table[n, j, m, code[o, j, m]] (+ bias) — one scalar load per codebook per group
   instead of decoding g weights. Rows are split into blocks for the thread pool; inside a block the input groups
   are walked in tiles whose slice of the table fits in L1, and R rows are accumulated at once so the adds form R
   independent chains.

It beats direct decode where decoding is expensive relative to the table (many codebooks or wide groups: 8x8g32),
and loses where the decode is already cheap (2x8g8); `kernels.registry` keeps whichever is faster per config.

Two code layouts:
- `gemv_lut`: the HF layout codes[out, in/g, M]. The walk by input-group tiles reads 16 bytes of each row's 1 KiB
  of codes per tile, so every 64-byte line comes back from L2 four times (8x8g32 11008×4096: 3.05 ms).
- `gemv_lut_grouped`: the group-major layout codes[in/g, out, M] (the layout the `aqlm` package's own CPU kernel
  uses, `codes_alt`). For one input group, the codes of a block of rows are contiguous and read once, the group's
  8 KiB slice of the table sits in L1 and the block's accumulators too (11008×4096: 2.08 ms). It needs the codes
  repacked once at load time (`to_group_major`). AVX2/AVX-512 gathers instead of scalar lookups were measured
  slower on Zen 4 (2.4–2.5 ms).

Two ways to share the work between threads:
- `gemv_lut`/`gemv_lut_grouped`: the table is filled in parallel over input groups, then the rows are split. Every
  task then reads table lines another core wrote: on Zen 1 (2 vCPUs) the small layers of SmolLM2 ran no faster, or
  slower, on 2 threads than on 1 (576x576: 68 µs on 1 thread, 74–97 µs on 2).
- `gemv_lut_split`: one task per tile of input groups fills its own tile of the table (16 KiB: it stays in that
  core's L1), adds that tile's lookups for every row into its own partial sums, and a last loop adds the partial
  sums. No table line moves between cores; the codes are read as a 16-byte slice of each row per tile, which is
  cheap only while they stay in L2 (4096²: 3.0 ms vs 2.8 ms; 11008x4096: 10.9 vs 4.5 ms), so it is for small
  layers.
"""

from __future__ import annotations

import numpy as np
from tvm.script import tirx as T

from .gemv_direct import GemvShape, _largest_divisor, tree_sum

OUT_MAJOR, GROUP_MAJOR = "out_major", "group_major"


def to_group_major(codes: np.ndarray) -> np.ndarray:
    """HF codes [out, in/g, M] → [in/g, out, M], the layout `gemv_lut_grouped` reads."""
    if codes.ndim != 3:
        raise ValueError(f"codes: expected [out, in/g, M], found shape {list(codes.shape)}")
    return np.ascontiguousarray(codes.transpose(1, 0, 2))


def _dims(shape: GemvShape, rows: int, block_rows: int):
    """Sizes both LUT kernels use: O, I, N, g, M, J, K, mask, PM (codebook rows), R (rows per step), RB (rows per
    thread-pool block), KV (table vector width)."""
    cfg = shape.config
    O, I, N, g, M = shape.out_features, shape.in_features, shape.batch, cfg.in_group_size, cfg.num_codebooks
    cfg.check_shape(O, I)
    J, K = I // g, cfg.codebook_size
    quantum = min(O, shape.row_quantum)
    R = _largest_divisor(quantum, rows)
    RB = max(_largest_divisor(quantum, max(block_rows, R)), R)
    return O, I, N, g, M, J, K, K - 1, shape.codebook_rows(), R, RB, min(K, 16)


def _fill_table(N: int, J: int, JT: int, PM: int, K: int, g: int, KV: int):
    """A TIR macro: table[j // JT, n, j % JT, m, k] = C_m[k] · x[n, j·g:(j+1)·g], vectorised over k from a transposed
    fp32 copy of the codebooks, parallel over input groups."""

    @T.macro
    def fill(x, cb, table):
        cbt_ = T.alloc_buffer((PM, g, K), "float32", scope="global")
        for m, k, t in T.grid(PM, K, g):
            cbt_[m, t, k] = T.Cast("float32", cb[m, k, t])
        for j in T.parallel(J):
            for n, m in T.grid(N, PM):
                for ko in range(K // KV):
                    for kv in T.vectorized(KV):
                        table[j // JT, n, j % JT, m, ko * KV + kv] = T.float32(0)
                    for t in range(g):
                        for kv in T.vectorized(KV):
                            table[j // JT, n, j % JT, m, ko * KV + kv] = table[j // JT, n, j % JT, m, ko * KV + kv] + \
                                cbt_[m, t, ko * KV + kv] * T.Cast("float32", x[n, j * g + t])

    return fill


def _tile_lookups(shape: GemvShape, R: int, JT: int, M: int, mask: int):
    """A TIR macro: part[r] = Σ_{jj < JT} Σ_m table[tile, n, jj, p·M + m, code[row + r, j0 + jj, m]] for R rows from
    `row` (p: their partition) — the inner step of `gemv_lut` and `gemv_lut_split` (R independent add chains)."""

    @T.macro
    def lookups(part, table, codes, tile, n, row, j0):
        for r in T.unroll(R):
            part[r] = T.float32(0)
        for jj in T.unroll(JT):
            for m in T.unroll(M):
                for r in T.unroll(R):
                    part[r] = part[r] + table[tile, n, jj, shape.partition_of(row) * M + m, T.bitwise_and(
                        T.Cast("int32", codes[row + r, j0 + jj, m]), mask)]

    return lookups


def gemv_lut(shape: GemvShape, rows: int = 8, tile_bytes: int = 16 * 1024, block_rows: int = 512,
             name: str = "aqlm_gemv_lut"):
    """A TIR PrimFunc with the same signature as `gemv_direct`: (x, codes, codebooks, scales, bias, y)."""
    O, I, N, g, M, J, K, mask, PM, R, RB, KV = _dims(shape, rows, block_rows)
    JT = _largest_divisor(J, max(1, tile_bytes // (N * PM * K * 4)))
    act, cbt, cdt = shape.act_dtype, shape.codebook_dtype, shape.code_dtype
    fill_table = _fill_table(N, J, JT, PM, K, g, KV)
    lookups = _tile_lookups(shape, R, JT, M, mask)

    @T.prim_func
    def kernel(x: T.Buffer((N, I), act), codes: T.Buffer((O, J, M), cdt), cb: T.Buffer((PM, K, g), cbt),
               scales: T.Buffer((O,), "float32"), bias: T.Buffer((O,), "float32"), y: T.Buffer((N, O), act)):
        T.func_attr({"global_symbol": name, "tirx.noalias": True})
        table = T.alloc_buffer((J // JT, N, JT, PM, K), "float32", scope="global")
        fill_table(x, cb, table)
        for ob in T.parallel(O // RB):
            acc = T.alloc_buffer((N, RB), "float32", scope="global")
            part = T.alloc_buffer((R,), "float32", scope="global")
            for n, r in T.grid(N, RB):
                acc[n, r] = T.float32(0)
            for jt in range(J // JT):
                for n in range(N):
                    for rb in range(RB // R):
                        lookups(part, table, codes, jt, n, ob * RB + rb * R, jt * JT)
                        for r in T.unroll(R):
                            acc[n, rb * R + r] = acc[n, rb * R + r] + part[r]
            for n, r in T.grid(N, RB):
                y[n, ob * RB + r] = T.Cast(act, acc[n, r] * scales[ob * RB + r] + bias[ob * RB + r])

    return kernel


def gemv_lut_grouped(shape: GemvShape, rows: int = 2, block_rows: int = 256, name: str = "aqlm_gemv_lut_grouped"):
    """`gemv_lut` for group-major codes: name(x[N, I], codes[I/g, O, M], codebooks, scales, bias, y[N, O]).

    Rows go to the thread pool in blocks of `block_rows`; a block keeps its N·block_rows accumulators, walks the
    input groups in order, and for each group adds Σ_m table[j, n, m, code] to `rows` rows at a time (a balanced
    tree of M adds each, so the adds do not form one chain). Measured on Zen 4 at 8x8g32: rows 2, blocks of 256
    (4096²: 0.83–0.91 ms; 11008×4096: 2.08 ms; larger blocks and more rows were no faster)."""
    O, I, N, g, M, J, K, mask, PM, R, RB, KV = _dims(shape, rows, block_rows)
    act, cbt, cdt = shape.act_dtype, shape.codebook_dtype, shape.code_dtype
    fill_table = _fill_table(N, J, 1, PM, K, g, KV)  # one group per tile: table[j, n, 0, m, k]

    @T.prim_func
    def kernel(x: T.Buffer((N, I), act), codes: T.Buffer((J, O, M), cdt), cb: T.Buffer((PM, K, g), cbt),
               scales: T.Buffer((O,), "float32"), bias: T.Buffer((O,), "float32"), y: T.Buffer((N, O), act)):
        T.func_attr({"global_symbol": name, "tirx.noalias": True})
        table = T.alloc_buffer((J, N, 1, PM, K), "float32", scope="global")
        fill_table(x, cb, table)
        for ob in T.parallel(O // RB):
            acc = T.alloc_buffer((N, RB), "float32", scope="global")
            for n, r in T.grid(N, RB):
                acc[n, r] = T.float32(0)
            for j in range(J):
                for n in range(N):
                    for ro in range(RB // R):
                        for r in T.unroll(R):
                            acc[n, ro * R + r] = acc[n, ro * R + r] + tree_sum([
                                table[j, n, 0, shape.partition_of(ob * RB + ro * R) * M + m, T.bitwise_and(
                                    T.Cast("int32", codes[j, ob * RB + ro * R + r, m]), mask)] for m in range(M)])
            for n, r in T.grid(N, RB):
                y[n, ob * RB + r] = T.Cast(act, acc[n, r] * scales[ob * RB + r] + bias[ob * RB + r])

    return kernel


def _split_tile(shape: GemvShape, tile_bytes: int = 16 * 1024, max_tasks: int | None = None) -> int:
    """Input groups per tile of `gemv_lut_split`: the largest divisor of in/g whose table slice fits `tile_bytes`,
    then grown (to the next divisor) until there are at most `max_tasks` tiles."""
    cfg = shape.config
    J = shape.in_features // cfg.in_group_size
    jt = _largest_divisor(J, max(1, tile_bytes // (shape.batch * shape.codebook_rows() * cfg.codebook_size * 4)))
    while max_tasks and J // jt > max_tasks:
        jt = next(d for d in range(jt + 1, J + 1) if J % d == 0)
    return jt


SPLIT_MAX_TASKS = 16


def split_tasks(shape: GemvShape) -> int:
    """How many thread-pool tasks `gemv_lut_split` makes for `shape` (its tiles of input groups)."""
    return shape.in_features // shape.config.in_group_size // _split_tile(shape, max_tasks=SPLIT_MAX_TASKS)


def gemv_lut_split(shape: GemvShape, rows: int = 8, tile_bytes: int = 16 * 1024, max_tasks: int | None = SPLIT_MAX_TASKS,
                   name: str = "aqlm_gemv_lut_split"):
    """`gemv_lut` with the thread-pool tasks over tiles of input groups (see the module docstring): same signature
    (x, codes[out, in/g, M] (HF layout), codebooks, scales, bias, y). Measured on Zen 1, 2 threads, 2x8g8 batch 1
    (hot caches): 1536x576 107 µs (gemv_lut 152, gemv_direct 338), 576x1536 91–150 (180, 179), 576x576 40 (46–97,
    122), 192x576 28–31 (31–39, 43). At most `max_tasks` tiles (past that the tiles grow beyond 16 KiB, into L2):
    every tile adds a row of partial sums for the last, single-threaded loop, and a fused layer's table holds every
    partition's codebooks, so 16 KiB tiles are few groups wide (fused q/k/v of SmolLM2: 36 tiles; single runs on a
    noisy Zen 1: 186–322 µs with 36 tiles, 127 with 16)."""
    O, I, N, g, M, J, K, mask, PM, R, RB, KV = _dims(shape, rows, 512)
    JT = _split_tile(shape, tile_bytes, max_tasks)
    C = J // JT
    act, cbt, cdt = shape.act_dtype, shape.codebook_dtype, shape.code_dtype
    lookups = _tile_lookups(shape, R, JT, M, mask)

    @T.prim_func
    def kernel(x: T.Buffer((N, I), act), codes: T.Buffer((O, J, M), cdt), cb: T.Buffer((PM, K, g), cbt),
               scales: T.Buffer((O,), "float32"), bias: T.Buffer((O,), "float32"), y: T.Buffer((N, O), act)):
        T.func_attr({"global_symbol": name, "tirx.noalias": True})
        partial = T.alloc_buffer((C, N, O), "float32", scope="global")
        acc = T.alloc_buffer((N, O), "float32", scope="global")
        cbt_ = T.alloc_buffer((PM, g, K), "float32", scope="global")
        for m, k, t in T.grid(PM, K, g):
            cbt_[m, t, k] = T.Cast("float32", cb[m, k, t])
        for c in T.parallel(C):
            table = T.alloc_buffer((1, N, JT, PM, K), "float32", scope="global")
            part = T.alloc_buffer((R,), "float32", scope="global")
            for jj, n, m in T.grid(JT, N, PM):
                for ko in range(K // KV):
                    for kv in T.vectorized(KV):
                        table[0, n, jj, m, ko * KV + kv] = T.float32(0)
                    for t in range(g):
                        for kv in T.vectorized(KV):
                            table[0, n, jj, m, ko * KV + kv] = table[0, n, jj, m, ko * KV + kv] + \
                                cbt_[m, t, ko * KV + kv] * T.Cast("float32", x[n, (c * JT + jj) * g + t])
            for n in range(N):
                for rb in range(O // R):
                    lookups(part, table, codes, 0, n, rb * R, c * JT)
                    for r in T.unroll(R):
                        partial[c, n, rb * R + r] = part[r]
        # the tiles' partial sums, added row-contiguously (vectorisable) rather than one row at a time over tiles
        for n, o in T.grid(N, O):
            acc[n, o] = partial[0, n, o]
        for c in range(1, C):
            for n, o in T.grid(N, O):
                acc[n, o] = acc[n, o] + partial[c, n, o]
        for n, o in T.grid(N, O):
            y[n, o] = T.Cast(act, acc[n, o] * scales[o] + bias[o])

    return kernel
