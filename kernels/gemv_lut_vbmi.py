"""Byte-permute lookup-table AQLM GEMV for x86 CPUs with AVX-512 VBMI and VNNI (decode, batch 1–8), for 8-bit codes.

The T-MAC route (Wei et al. 2024) applied to AQLM's 256-entry codebooks. Per input group j, codebook m and token n,
the table holds the 256 partial dot products t[n, j, m, k] = C_m[k] · x[n, j·g:(j+1)·g], rounded to 16 bits with one
scale per token, block of `group_block` groups and fused partition. The scale comes from a bound known before the
table is computed, |t| ≤ max_{m,k} |C_m[k]| · max_j |x_j| over the partition's codebooks and the block's groups
(Cauchy–Schwarz), so the table is written in one pass.

The default (stop 40, `sum16` and `int_table`):
- **The table in integers** (`int_table`): each task quantizes the codebooks to int16 (±32767 · the partition's
  max |C|) with the two inputs of a pair in one int32, and x to int16 per block so that the bound maps to
  QMAX·2^16; `vpdpwssd` adds 32 exact products per instruction (an fp32 FMA does 16), and the entry is the int32 sum
  shifted right by 16 (rounded). The x and codebook rounding (≈ 1/10⁴ of the bound) is below the table's own.
- **Whole 16-bit entries summed in int16** (`sum16`): each entry is stored as two byte planes (vpackssdw and one
  vpermi2b per plane: the signed high byte and the low byte). Rows go in tiles of 64 (one zmm register of int8
  codes). For each group and codebook, the 64 codes of a tile are one 64-byte load. `vpermi2b` looks 64 rows up at
  once in a 128-entry half of a plane (two registers), and the code's top bit picks the half (codes are stored
  signed: code ≥ 128 ⇔ byte < 0). `vpunpck{l,h}bw` of the two planes' lookups rebuild the 64 int16 entries, which
  add up (saturating) in int16 over a block. So that the sum cannot overflow, an entry may use 1/(JB·M) of the range:
  QMAX = 32767 // (JB·M), 4095 with the default JB·M = 8. Then fp32: Σ × the block's scale; y = scale[o] · Σ + bias.
- **RT row tiles per pass** (`row_tiles`): the RT tiles of one partition share each (group, codebook) table, so it
  is loaded into registers once for all of them; the int16 sums stay in registers (constant-index stack buffers).
The old route (`sum16=False`: each byte plane summed separately, then Σhigh·256 + Σlow, entries to 1/32767 of the
bound, from an fp32 FMA table) stays as the reference: 10× smaller table error (5e-5 vs 4.7e-4 relative output error
on random layers), measured end to end by benchmarks/lut_decode_ppl.py.

Work is split over the input groups (see `gemv_lut_vbmi`). Measured on the 2-vCPU Zen 4 VM, 2 threads, 2x8g8
(benchmarks in the function docstrings): 4096² 0.22 ms against 0.54 for `gemv_direct`, 11008×4096 0.62 vs 1.59.
The one-pass table (stop 36) replaced a two-pass one that scaled by the block's measured peak, and each thread-pool
task now makes its own fp32 copy of the codebooks: on the 2-vCPU Xeon VM, 2 threads, 576×576 14.5 → 11.3 → 7.3 µs,
1536×576 19.4 → 16.8 → 12.2, 576×1536 29.5 → 20.5 → 18.2 (hand-run; docs/tvm-and-ort-notes.md N30). Its accuracy:
benchmarks/lut_decode_ppl.py.

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

import math
import os

import numpy as np
from tvm.script import tirx as T

from .gemv_direct import GemvShape, _largest_divisor, tree_sum

ROW_TILED = "row_tiled64"
TILE_ROWS = 64
# what the kernel's default table is, in words (benchmarks/lut_decode_ppl.py labels its result with it)
DEFAULT_TABLE = "integer table (vpdpwssd), 12-bit entries summed in int16"
REQUIRED_FEATURES = ("avx512bw", "avx512vbmi", "avx512vnni")  # vnni: the integer table (vpdpwssd)


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


# Rows per table from which the kernel beats `gemv_direct`, by batch (none above 4 tokens). Measured on the 2-vCPU Xeon
# VM (AVX-512 VBMI), 2 threads, 2x8g8, µs LUT vs direct (hand-run, stop 36):
# - batch 1: 192×576 5.1 vs 5.0, 256×576 5.5 vs 6.3, 576×576 7.3 vs 13.4, 256×1536 14.4 vs 16.2, 1536×576 12.2 vs 33.3;
# - batch 2: 384×576 11.8 vs 10.7, 576×576 14.0 vs 14.7, 576×1536 37.0 vs 38.8, 256×1536 23.4 vs 17.0;
# - batch 3: 576×576 19.2 vs 18.1, 1536×576 36.4 vs 46.3, 1024×4096 166 vs 220;
# - batch 4: 1536×576 45.9 vs 49.4, 1024×4096 231 vs 224, 4096² 769 vs 927; batch 8: 4096² 1972 vs 1555.
LUT_MIN_ROWS = {1: 256, 2: 576, 3: 1024, 4: 1536}


def pays_off(shape: GemvShape) -> str | None:
    """None when the kernel beats `gemv_direct` at `shape`, else why not. The table costs M·256·g multiply-adds per
    input group and token whatever the row count, and the lookups are per token too, while the direct kernel decodes
    each weight once for the whole batch: the LUT kernel needs more rows per table as the batch grows
    (`LUT_MIN_ROWS`)."""
    rows = shape.out_features // len(shape.parts)  # one table per partition
    need = LUT_MIN_ROWS.get(shape.batch)
    if need is not None and rows >= need:
        return None
    return (f"{rows} rows per table at batch {shape.batch}: the table and lookups (per token) cost more than "
            f"decoding the weights once" + (f" (from {need} rows)" if need else ""))


def prepared_codebooks(codebooks: np.ndarray, partitions: int = 1) -> np.ndarray:
    """The integer table's codebooks as `gemv_lut_vbmi(prepared=True)` reads them, from fp16 codebooks [P·M, 256, g]
    of `partitions` partitions: int32 [P·M·g/2·256 + 2P] = the int16 pairs cq[pm, tp, k] (codeword k's inputs 2tp and
    2tp+1, each rounded from C · 32767 / max|C| of its partition, in fp32 as the kernel computes them), then per
    partition that max|C| and the largest squared norm of its quantized codewords (the table's bound), as fp32
    bits. The kernel would otherwise compute all of it in every task of every call."""
    cb = np.asarray(codebooks)
    if cb.ndim != 3 or cb.shape[0] % partitions or cb.shape[2] % 2:
        raise ValueError(f"codebooks: expected [P·M, K, g] with g even and P = {partitions}, found shape {list(cb.shape)}")
    pm, k, g = cb.shape
    m = pm // partitions
    c32 = cb.astype(np.float32)
    cq = np.empty((pm, g // 2, k), np.int32)
    stats = np.empty((partitions, 2), np.float32)
    for p in range(partitions):
        block = c32[p * m:(p + 1) * m]
        cabs = np.float32(max(float(np.abs(block).max()), 1e-30))
        q = np.rint(block * (np.float32(32767) / cabs)).astype(np.int64)  # [m, K, g]; half to even, as vcvtps2dq
        pairs = (q[..., 0::2] & 0xFFFF) | ((q[..., 1::2] & 0xFFFF) << 16)  # [m, K, g/2]
        cq[p * m:(p + 1) * m] = pairs.astype(np.uint32).view(np.int32).transpose(0, 2, 1)
        stats[p] = cabs, max(float((q.astype(np.float64) ** 2).sum(-1).max()), 1e-30)
    return np.concatenate([cq.ravel(), stats.view(np.int32).ravel()])


def default_chunks(in_features: int) -> int:
    """Thread-pool tasks over the input groups (`gemv_lut_vbmi`'s `chunks`): as many as this machine's cores up to
    2048 inputs, 8 (or the cores, if more) above, at most 8. Each task quantizes x again, writes its own partial
    sums and builds its own table (1 KB per input group at 2 codebooks): at SmolLM2's widths tasks beyond the pool's
    threads only cost, while at 7B widths a task's table must stay small next to the codes streaming through L2.
    Hand-run on the 2-vCPU Zen 4 VM, 2 threads, µs at chunks 8 / 4 / 2 (docs/tvm-and-ort-notes.md N37): 576×1536
    15.3 / 13.3 / 13.1, q/k/v 960×576 13.9 / 12.9 / 12.7, 576×576 6.3 / 6.0 / 5.9, 3072×576 17.9 either way. The
    7B-shaped model's decode step with 2 tasks at 4096 inputs and 4 at 11008: ≈ 12% slower than with 8 (N37)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(8, cores if in_features <= 2048 else max(cores, 8)))


def gemv_lut_vbmi(shape: GemvShape, group_block: int | None = None, chunks: int | None = None, planes: int = 2,
                  prefetch: int = 1, sum16: bool = True, int_table: bool = True, row_tiles: int = 4,
                  vector_codebooks: bool = True, vector_x: bool = True, prepared: bool = False,
                  name: str = "aqlm_gemv_lut_vbmi"):
    """A TIR PrimFunc `name(x[N, I], codes[O, I/g, M] (ROW_TILED bytes), codebooks[P·M, 256, g], scales[O],
    bias[O], y[N, O])`.

    Split over the input dimension: the input groups are cut into `chunks` (the largest divisor of the scale
    blocks not above it; default `default_chunks`), one thread-pool task each. A task builds the table of its own
    groups only (in L2: 512 bytes per group and codebook), looks up every row tile over those groups, and writes its
    partial sums;
    the partials are added (times the row scales, plus bias) at the end. Split over rows instead, every thread
    needs the whole table, which then crosses between cores and is re-read from L2 per row tile (measured on the
    2-vCPU Zen 4 VM: 4096² 0.21 vs 0.14 ms, 576×1536 51 vs 24 µs). `group_block`: input groups sharing one table
    scale (the largest divisor of I/g not above it). `prefetch`: software-prefetch each 64-byte line of codes this
    many row tiles ahead (a task reads one 64·M·groups-byte run per tile, jumping between runs, which the hardware
    prefetcher follows late; with weights from DRAM, 11008×4096 1.23 → 0.86 ms and 4096² 0.47 → 0.34 ms; 0: off).
    `prepared`: the third argument is `prepared_codebooks(codebooks, P)` (int32 [P·M·g/2·256 + 2P]: the int16
    codebook pairs and each partition's scale and norm bound, computed once when the model is built) instead of the
    fp16 codebooks, which every task of every call otherwise quantizes again (int_table only)."""
    cfg = shape.config
    O, I, N, g, M = shape.out_features, shape.in_features, shape.batch, cfg.in_group_size, cfg.num_codebooks
    cfg.check_shape(O, I)
    why = unsupported(shape)
    if why:
        raise ValueError(f"gemv_lut_vbmi {O}x{I} {cfg.name}: {why}")
    J, K, TR, KV = I // g, 256, TILE_ROWS, 16
    if planes not in (1, 2):
        raise ValueError(f"planes {planes}: expected 1 (int8 table) or 2 (16-bit table as two byte planes)")
    sum16 = sum16 and planes == 2  # the int8 table (planes=1) sums bytes, as the two-plane one without sum16
    int_table = int_table and planes == 2  # the int8 table (planes=1) stays fp32
    if int_table and g % 2:
        raise ValueError("int_table multiplies pairs of inputs: the group size must be even")
    if prepared and not int_table:
        raise ValueError("prepared codebooks are the integer table's (int_table=True, planes=2)")
    # int_table's codebook quantization in vectors of 16 pairs (the same values as the scalar loop, which stays for
    # group sizes that do not divide 32)
    vector_codebooks = vector_codebooks and int_table and 32 % g == 0
    if group_block is None:  # sum16: JB·M entries share the int16 range, so ≈ 8 per block keeps 12-bit entries
        group_block = max(1, 8 // M) if sum16 else 4
    # int16 block sums must not overflow: a byte lookup is ≤ 255 in magnitude, M of them per group
    JB = _largest_divisor(J, group_block if sum16 else min(group_block, 32767 // (255 * M)))  # groups per scale
    # sum16: whole entries add up in int16, so an entry may use 1/(JB·M) of the int16 range
    QMAX = 127 if planes == 1 else (min(4095, 32767 // (JB * M)) if sum16 else 32767)
    # int_table: the int32 dot products are bounded by QMAX·2^SHIFT ≈ 2^30 and the entry is the sum >> SHIFT; then
    # |xq_j| ≤ QMAX·2^SHIFT / (1.003 |Cq|max) < 32767 (|Cq|max ≥ 32767, the largest element) fits int16, and no
    # int32 sum (nor vpdpwssd's pair sums: Cauchy–Schwarz on any subset) can overflow
    SHIFT = 30 - QMAX.bit_length()
    # int_table: x rounded to int16 pairs 16 inputs at a time where a scale block holds a multiple of 16 inputs
    vector_x = vector_x and int_table and (JB * g) % 16 == 0
    NBLK = J // JB
    C = _largest_divisor(NBLK, chunks or default_chunks(I))  # thread-pool tasks
    BC = NBLK // C  # scale blocks per task
    JC = BC * JB  # input groups per task
    PM = shape.codebook_rows()
    act, cbt_dtype = shape.act_dtype, shape.codebook_dtype

    P = len(shape.parts)
    # row tiles per lookup pass: each (group, codebook) table is loaded once for all of them; they must not straddle
    # two partitions
    part_tiles = math.gcd(*[size // TR for size in shape.parts])
    RT = max(d for d in range(1, row_tiles + 1) if part_tiles % d == 0)
    JU = max(d for d in range(1, 7) if JC % d == 0)  # groups per table pass: 4·JU zmm accumulators stay in registers

    def to_int32(v):  # vcvtps2dq: round to nearest in one instruction (nearbyint + a cast was three)
        return T.call_llvm_pure_intrin("int32x16", "llvm.x86.avx512.mask.cvtps2dq.512", v,
                                       T.Broadcast(T.int32(0), 16), T.int16(-1), T.int32(4))

    def packed_bytes(a, b):  # two int32x16 → 32 saturated int16 (in-lane order, undone by `plane_order`)
        return T.reinterpret("int8x64", T.call_llvm_pure_intrin("int16x32", "llvm.x86.avx512.packssdw.512", a, b))

    def plane_order(high: int):
        """vpermi2b indices taking, for table entries e = 0..63, byte `high` of entry e's int16 out of the two packs
        packed_bytes(e 0–15, e 16–31) and packed_bytes(e 32–47, e 48–63): vpackssdw interleaves its operands per
        128-bit lane (4 words of one, then 4 of the other), so entry e (< 32) is word
        (e%16)//4·8 + e%4 + 4·(e//16)."""
        def c(v):
            return T.Broadcast(T.int8(v), 64)
        e = T.ramp(T.int8(0), T.int8(1), 64)
        ee = T.bitwise_and(e, c(31))
        word = T.shift_left(T.shift_right(T.bitwise_and(ee, c(15)), c(2)), c(3)) + T.bitwise_and(ee, c(3)) + \
            T.shift_left(T.shift_right(ee, c(4)), c(2))
        return T.shift_left(word, c(1)) + T.shift_left(T.shift_right(e, c(5)), c(6)) + c(high)

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

    def unpacked_row(r):  # the tile row whose entry is word r (of 64) of the sum16 partial sums
        return (r % 32) // 8 * 16 + r // 32 * 8 + r % 8

    # int16 partial sums per token and row tile: sum16 keeps the two unpacked halves of 32 rows apart (one vector
    # type per buffer, so LLVM keeps them in registers), else one vector of 64 rows per plane
    NPART, PW = (2, 32) if sum16 else (planes, TR)

    def unpack_indices(h: int):
        """Shuffle indices of vpunpcklbw (h=0) / vpunpckhbw (h=1) over [low plane (0–63), high plane (64–127)]: per
        128-bit lane L, output word i is (low[16L + 8h + i], high[16L + 8h + i]), i.e. the little-endian int16 entry
        of row 16L + 8h + i."""
        return [16 * (o // 16) + 8 * h + (o % 16) // 2 + 64 * (o % 2) for o in range(64)]

    def combine(part, rt, n, h, r):  # h: which vector of PW rows (sum16: the unpacked half; else 0)
        if sum16:
            return T.Cast("float32", part[rt, h, n, r])
        if planes == 1:
            return T.Cast("float32", part[rt, 0, n, r])
        return T.Cast("float32", part[rt, 0, n, r]) * T.float32(256) + T.Cast("float32", part[rt, 1, n, r])

    NCQ = PM * (g // 2) * K  # prepared: the int16 pairs, then (scale, norm bound) per partition as fp32 bits
    CB_SHAPE, CB_DTYPE = ((NCQ + 2 * P,), "int32") if prepared else ((PM, K, g), cbt_dtype)

    @T.prim_func
    def kernel(x: T.Buffer((N, I), act), codes: T.Buffer((O, J, M), "int8"), cb: T.Buffer(CB_SHAPE, CB_DTYPE),
               scales: T.Buffer((O,), "float32"), bias: T.Buffer((O,), "float32"), y: T.Buffer((N, O), act)):
        T.func_attr({"global_symbol": name, "tirx.noalias": True})
        tiles = T.decl_buffer((O // TR, J, M, TR), "int8", data=codes.data)
        partial = T.alloc_buffer((C, N, O), "float32", scope="global")
        for c in T.parallel(C):
            # each task its own fp32 codebooks: written by one thread and read by the other, they cost more in
            # cross-core transfers than the copy itself (hand-run, stop 36)
            norms = T.alloc_buffer((PM, KV), "float32", scope="global")
            cmax = T.alloc_buffer((P,), "float32", scope="global")
            if prepared:  # read-only, shared by the tasks (written once, at load time)
                cq = T.decl_buffer((PM, g // 2, K), "int32", data=cb.data)
                cabs = T.alloc_buffer((P,), "float32", scope="global")
                for p in range(P):
                    cabs[p] = T.reinterpret("float32", cb[NCQ + 2 * p])
                    cmax[p] = T.reinterpret("float32", cb[NCQ + 2 * p + 1])
            elif int_table:
                # int16 codebooks (±32767 · max |C| of the partition), the two inputs of a pair in one int32, so
                # vpdpwssd multiplies and adds 32 codeword·input products per instruction
                cabs = T.alloc_buffer((P,), "float32", scope="global")
                cmx = T.alloc_buffer((KV,), "float32", scope="global")
                cinv = T.alloc_buffer((P,), "float32", scope="global")
                cq = T.alloc_buffer((PM, g // 2, K), "int32", scope="global")
                cbf = T.decl_buffer((PM, K * g), cbt_dtype, data=cb.data)
                for p in range(P):
                    for v in T.vectorized(KV):
                        cmx[v] = T.float32(1e-30)
                    for mm, e in T.grid(M, K * g // KV):
                        for v in T.vectorized(KV):
                            cmx[v] = T.max(cmx[v], T.abs(T.Cast("float32", cbf[p * M + mm, e * KV + v])))
                    cabs[p] = T.float32(1e-30)
                    for v in range(KV):
                        cabs[p] = T.max(cabs[p], cmx[v])
                    cinv[p] = T.float32(32767) / cabs[p]
                if vector_codebooks:
                    # 32 // g codewords (32 values) rounded to int16 are 16 int32 pairs in (codeword, pair) order;
                    # a shuffle of g/2 such vectors gives, per pair tp, 16 consecutive codewords (flat lane
                    # k·g/2 + tp). The scalar loop (below) was ≈ 1 µs of a fused q/k/v call: every task repeats it
                    cqv = T.alloc_buffer((g // 2, KV), "int32", scope="global")
                    for pm, kb in T.grid(PM, K // KV):
                        for i in T.unroll(g // 2):
                            for h in T.unroll(2):
                                cqv[i, T.ramp(h * 8, 1, 8)] = T.reinterpret("int32x8", T.Cast("int16x16", T.Cast(
                                    "int32x16", T.round(T.Cast("float32x16", cbf[pm, T.ramp(
                                        kb * KV * g + i * 32 + h * 16, 1, 16)]) * T.Broadcast(cinv[pm // M], 16)))))
                        for tp in T.unroll(g // 2):
                            cq[pm, tp, T.ramp(kb * KV, 1, KV)] = T.Shuffle(
                                [cqv[i, T.ramp(0, 1, KV)] for i in range(g // 2)],
                                [k * (g // 2) + tp for k in range(KV)])
                else:
                    for pm, k, tp in T.grid(PM, K, g // 2):
                        cq[pm, tp, k] = T.bitwise_or(
                            T.bitwise_and(T.Cast("int32", T.round(T.Cast("float32", cb[pm, k, 2 * tp]) *
                                                                  cinv[pm // M])), 65535),
                            T.shift_left(T.Cast("int32", T.round(T.Cast("float32", cb[pm, k, 2 * tp + 1]) *
                                                                 cinv[pm // M])), 16))
                for pm in range(PM):
                    for v in T.vectorized(KV):
                        norms[pm, v] = T.float32(0)
                    for ko in range(K // KV):
                        for v in T.vectorized(KV):
                            norms[pm, v] = T.max(norms[pm, v], tree_sum(
                                [T.Cast("float32", T.shift_right(T.shift_left(cq[pm, tp, ko * KV + v], 16), 16)) *
                                 T.Cast("float32", T.shift_right(T.shift_left(cq[pm, tp, ko * KV + v], 16), 16)) +
                                 T.Cast("float32", T.shift_right(cq[pm, tp, ko * KV + v], 16)) *
                                 T.Cast("float32", T.shift_right(cq[pm, tp, ko * KV + v], 16))
                                 for tp in range(g // 2)]))
            else:
                # each task its own fp32 codebooks: written by one thread and read by the other, they cost more in
                # cross-core transfers than the copy itself (hand-run, stop 36)
                cbt = T.alloc_buffer((PM, g, K), "float32", scope="global")
                for pm, k, t in T.grid(PM, K, g):  # scalar: the vectorised transpose (gathers) measured 6× slower
                    cbt[pm, t, k] = T.Cast("float32", cb[pm, k, t])
                # |C_k · x_j| ≤ |C_k| |x_j|: the largest squared codeword norm per partition bounds the table, so its
                # scale is known before it is computed and the table is written in one pass (no fp32 copy, no peak
                # search)
                for pm in range(PM):
                    for v in T.vectorized(KV):
                        norms[pm, v] = T.float32(0)
                    for ko in range(K // KV):
                        for v in T.vectorized(KV):
                            norms[pm, v] = T.max(norms[pm, v], tree_sum(
                                [cbt[pm, t, ko * KV + v] * cbt[pm, t, ko * KV + v] for t in range(g)]))
            if not prepared:
                for p in range(P):
                    cmax[p] = T.float32(1e-30)  # all-zero codebooks: any scale, the table is zeros
                    for mm, v in T.grid(M, KV):
                        cmax[p] = T.max(cmax[p], norms[p * M + mm, v])
            table = T.alloc_buffer((planes, N, JC, PM, K), "int8", scope="global")
            table_scale = T.alloc_buffer((N, P, BC), "float32", scope="global")
            xs = T.alloc_buffer((P, N, JC, g), "float32", scope="global")  # x in table units
            # int_table: x pairs, int16 each, pair tp of group j at j·g/2 + tp
            xq = T.alloc_buffer((P, N, JC * g // 2), "int32", scope="global")
            xn = T.alloc_buffer((1,), "float32", scope="global")
            xf = T.alloc_buffer((1,), "float32", scope="global")
            acc_t = T.alloc_buffer((JU, 4, KV), "float32", scope="global")
            acc_i = T.alloc_buffer((JU, 4, KV), "int32", scope="global")
            for n, bb in T.grid(N, BC):  # one scale per block of JB groups (and partition)
                xn[0] = T.float32(1e-30)
                for jj in range(JB):
                    xn[0] = T.max(xn[0], tree_sum([T.Cast("float32", x[n, (c * JC + bb * JB + jj) * g + t]) *
                                                   T.Cast("float32", x[n, (c * JC + bb * JB + jj) * g + t])
                                                   for t in range(g)]))
                for p in range(P):
                    if int_table:
                        # |Cq_k · xq_j| ≤ |Cq_k| |xq_j| ≤ QMAX·2^SHIFT (1.003: the rounding of xq, at most √g/2 of
                        # |xq_j| ≥ QMAX·2^SHIFT/(32767·√g) ≈ 11585); the table entry is the int32 sum shifted right
                        # by SHIFT (rounded)
                        table_scale[n, p, bb] = T.sqrt(xn[0] * cmax[p]) * T.float32(1.003 / QMAX) * \
                            cabs[p] / T.float32(32767)
                        xf[0] = T.float32(2 ** SHIFT / 32767) * cabs[p] / table_scale[n, p, bb]  # x → xq units
                        if vector_x:  # 16 inputs (8 pairs) at a time, the same values as the scalar loop
                            for i in T.unroll(JB * g // 16):
                                xq[p, n, T.ramp(bb * JB * g // 2 + i * 8, 1, 8)] = T.reinterpret(
                                    "int32x8", T.Cast("int16x16", T.Cast("int32x16", T.round(T.Cast(
                                        "float32x16", x[n, T.ramp((c * JC + bb * JB) * g + i * 16, 1, 16)]) *
                                        T.Broadcast(xf[0], 16)))))
                        else:
                            for jj, tp in T.grid(JB, g // 2):
                                xq[p, n, (bb * JB + jj) * (g // 2) + tp] = T.bitwise_or(
                                    T.bitwise_and(T.Cast("int32", T.round(
                                        T.Cast("float32", x[n, (c * JC + bb * JB + jj) * g + 2 * tp]) * xf[0])),
                                        65535),
                                    T.shift_left(T.Cast("int32", T.round(
                                        T.Cast("float32", x[n, (c * JC + bb * JB + jj) * g + 2 * tp + 1]) *
                                        xf[0])), 16))
                    else:
                        # 1.0001: the fp32 rounding of the bound and of the table entries stays inside QMAX
                        table_scale[n, p, bb] = T.sqrt(xn[0] * cmax[p]) * T.float32(1.0001 / QMAX)
                        for jj, t in T.grid(JB, g):
                            xs[p, n, bb * JB + jj, t] = T.Cast("float32", x[n, (c * JC + bb * JB + jj) * g + t]) / \
                                table_scale[n, p, bb]
            for n, pm, kq, jo in T.grid(N, PM, K // 64, JC // JU):  # 64 entries of JU groups' tables at a time
                if int_table:
                    for jj, q in T.grid(JU, 4):
                        for v in T.vectorized(KV):
                            acc_i[jj, q, v] = T.int32(1 << (SHIFT - 1))  # rounds the shift to nearest
                    for tp in T.unroll(g // 2):
                        for jj in T.unroll(JU):
                            for q in T.unroll(4):
                                acc_i[jj, q, T.ramp(0, 1, KV)] = T.call_llvm_pure_intrin(
                                    "int32x16", "llvm.x86.avx512.vpdpwssd.512", acc_i[jj, q, T.ramp(0, 1, KV)],
                                    T.reinterpret("int16x32", cq[pm, tp, T.ramp(kq * 64 + q * KV, 1, KV)]),
                                    T.reinterpret("int16x32",
                                                  T.Broadcast(xq[pm // M, n, (jo * JU + jj) * (g // 2) + tp], KV)))
                    for jj in T.unroll(JU):
                        for q in T.unroll(2):
                            table[q, n, jo * JU + jj, pm, T.ramp(kq * 64, 1, 64)] = T.call_llvm_pure_intrin(
                                "int8x64", "llvm.x86.avx512.vpermi2var.qi.512",
                                packed_bytes(T.shift_right(acc_i[jj, 0, T.ramp(0, 1, KV)], T.Broadcast(SHIFT, KV)),
                                             T.shift_right(acc_i[jj, 1, T.ramp(0, 1, KV)], T.Broadcast(SHIFT, KV))),
                                plane_order(1 - q),
                                packed_bytes(T.shift_right(acc_i[jj, 2, T.ramp(0, 1, KV)], T.Broadcast(SHIFT, KV)),
                                             T.shift_right(acc_i[jj, 3, T.ramp(0, 1, KV)], T.Broadcast(SHIFT, KV))))
                else:
                    for jj, q in T.grid(JU, 4):
                        for v in T.vectorized(KV):
                            acc_t[jj, q, v] = T.float32(0)
                    for t in T.unroll(g):
                        for jj in T.unroll(JU):
                            for q in T.unroll(4):
                                for v in T.vectorized(KV):
                                    acc_t[jj, q, v] = acc_t[jj, q, v] + cbt[pm, t, kq * 64 + q * KV + v] * \
                                        xs[pm // M, n, jo * JU + jj, t]
                    for jj in T.unroll(JU):
                        if planes == 1:
                            for q in T.unroll(4):
                                table[0, n, jo * JU + jj, pm, T.ramp(kq * 64 + q * KV, 1, KV)] = T.Cast(
                                    "int8x16", to_int32(acc_t[jj, q, T.ramp(0, 1, KV)]))
                        else:  # the signed high bytes to plane 0, the low bytes to plane 1
                            for q in T.unroll(2):
                                table[q, n, jo * JU + jj, pm, T.ramp(kq * 64, 1, 64)] = T.call_llvm_pure_intrin(
                                    "int8x64", "llvm.x86.avx512.vpermi2var.qi.512",
                                    packed_bytes(to_int32(acc_t[jj, 0, T.ramp(0, 1, KV)]),
                                                 to_int32(acc_t[jj, 1, T.ramp(0, 1, KV)])),
                                    plane_order(1 - q),
                                    packed_bytes(to_int32(acc_t[jj, 2, T.ramp(0, 1, KV)]),
                                                 to_int32(acc_t[jj, 3, T.ramp(0, 1, KV)])))
            # small "global" allocations (not "local": LowerTVMBuiltin) go on the stack, and only on the stack
            # (with constant indices) does LLVM keep `part` in registers
            acc = T.alloc_buffer((RT, N, TR), "float32", scope="global")
            part = T.alloc_buffer((RT, NPART, N, PW), "int16", scope="global")
            for obo in range(O // TR // RT):  # RT row tiles per pass over this task's groups
                for rt, n in T.grid(RT, N):
                    for r in T.vectorized(TR):
                        acc[rt, n, r] = T.float32(0)
                for bb in range(BC):
                    # every access to `part` at constant indices (unrolled loops), so LLVM keeps it in registers
                    for rt in T.unroll(RT):
                        for q in T.unroll(NPART):
                            for n in T.unroll(N):
                                for r in T.vectorized(PW):
                                    part[rt, q, n, r] = T.int16(0)
                    for jj in range(JB):
                        for m in T.unroll(M):
                            for n in T.unroll(N):
                                # the RT tiles share one partition, so one table: its loads are reused across them
                                for rt in T.unroll(RT):
                                    if prefetch > 0:  # the same line of the tile `prefetch` passes ahead
                                        T.evaluate(T.call_llvm_intrin("void", "llvm.prefetch.p0", T.address_of(
                                            tiles[T.min((obo + prefetch) * RT + rt, O // TR - 1),
                                                  c * JC + bb * JB + jj, m, 0]),
                                            T.int32(0), T.int32(3), T.int32(1)))
                                    # the codes and codebook row are passed as expressions, not bound to names: bound
                                    # (a TIR let), the codes vector was stored to the stack at every use (seen in the
                                    # generated assembly; ≈ 2% of the kernel, hand-measured)
                                    if sum16:  # vpunpck{l,h}bw rebuild 32 whole entries each (`unpacked_row` order)
                                        for h in T.unroll(2):
                                            part[rt, h, n, T.ramp(0, 1, 32)] = T.call_llvm_pure_intrin(
                                                "int16x32", "llvm.sadd.sat.v32i16", part[rt, h, n, T.ramp(0, 1, 32)],
                                                T.reinterpret("int16x32", T.Shuffle(
                                                    [lookup(table, 1, n, bb * JB + jj,
                                                            shape.partition_of(obo * RT * TR) * M + m,
                                                            tiles[obo * RT + rt, c * JC + bb * JB + jj, m,
                                                                  T.ramp(0, 1, TR)]),
                                                     lookup(table, 0, n, bb * JB + jj,
                                                            shape.partition_of(obo * RT * TR) * M + m,
                                                            tiles[obo * RT + rt, c * JC + bb * JB + jj, m,
                                                                  T.ramp(0, 1, TR)])],
                                                    [16 * (o // 16) + 8 * h + (o % 16) // 2 + 64 * (o % 2)
                                                     for o in range(64)])))
                                    else:
                                        part[rt, 0, n, T.ramp(0, 1, TR)] = part[rt, 0, n, T.ramp(0, 1, TR)] + widen(
                                            0, lookup(table, 0, n, bb * JB + jj,
                                                      shape.partition_of(obo * RT * TR) * M + m,
                                                      tiles[obo * RT + rt, c * JC + bb * JB + jj, m,
                                                            T.ramp(0, 1, TR)]))
                                        if planes == 2:
                                            part[rt, 1, n, T.ramp(0, 1, TR)] = part[rt, 1, n, T.ramp(0, 1, TR)] + \
                                                widen(1, lookup(table, 1, n, bb * JB + jj,
                                                                shape.partition_of(obo * RT * TR) * M + m,
                                                                tiles[obo * RT + rt, c * JC + bb * JB + jj, m,
                                                                      T.ramp(0, 1, TR)]))
                    for rt in T.unroll(RT):
                        for n in T.unroll(N):
                            for h in T.unroll(TR // PW):
                                for r in T.vectorized(PW):
                                    acc[rt, n, h * PW + r] = acc[rt, n, h * PW + r] + \
                                        combine(part, rt, n, h, r) * table_scale[n, shape.partition_of(obo * RT * TR), bb]
                for rt, n in T.grid(RT, N):
                    for r in T.vectorized(TR):
                        partial[c, n, (obo * RT + rt) * TR + r] = acc[rt, n, r]
        if sum16:
            # partials hold each tile's rows in unpacked order: word w of half h is row 16·(w//8) + 8·h + w%8, so
            # eight consecutive partials are eight consecutive rows
            total8 = T.alloc_buffer((8,), "float32", scope="global")
            for n, ob, w8 in T.grid(N, O // TR, 8):
                for v in T.vectorized(8):
                    total8[v] = partial[0, n, ob * TR + w8 * 8 + v]
                for c in range(1, C):
                    for v in T.vectorized(8):
                        total8[v] = total8[v] + partial[c, n, ob * TR + w8 * 8 + v]
                for v in T.vectorized(8):
                    y[n, ob * TR + unpacked_row(w8 * 8 + v)] = T.Cast(
                        act, total8[v] * scales[ob * TR + unpacked_row(w8 * 8 + v)] +
                        bias[ob * TR + unpacked_row(w8 * 8 + v)])
        else:
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
