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
"""

from __future__ import annotations

from tvm.script import tirx as T

from .gemv_direct import GemvShape, _largest_divisor


def gemv_lut(shape: GemvShape, rows: int = 8, tile_bytes: int = 16 * 1024, block_rows: int = 512,
             name: str = "aqlm_gemv_lut"):
    """A TIR PrimFunc with the same signature as `gemv_direct`: (x, codes, codebooks, scales, bias, y)."""
    cfg = shape.config
    O, I, N, g, M = shape.out_features, shape.in_features, shape.batch, cfg.in_group_size, cfg.num_codebooks
    cfg.check_shape(O, I)
    J, K, mask = I // g, cfg.codebook_size, cfg.codebook_size - 1
    PM = shape.codebook_rows()
    quantum = min(O, shape.row_quantum)
    R = _largest_divisor(quantum, rows)
    RB = max(_largest_divisor(quantum, max(block_rows, R)), R)
    JT = _largest_divisor(J, max(1, tile_bytes // (N * PM * K * 4)))
    act, cbt, cdt = shape.act_dtype, shape.codebook_dtype, shape.code_dtype
    KV = min(K, 16)

    @T.prim_func
    def kernel(x: T.Buffer((N, I), act), codes: T.Buffer((O, J, M), cdt), cb: T.Buffer((PM, K, g), cbt),
               scales: T.Buffer((O,), "float32"), bias: T.Buffer((O,), "float32"), y: T.Buffer((N, O), act)):
        T.func_attr({"global_symbol": name, "tirx.noalias": True})
        cbt_ = T.alloc_buffer((PM, g, K), "float32", scope="global")
        table = T.alloc_buffer((J // JT, N, JT, PM, K), "float32", scope="global")
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
        for ob in T.parallel(O // RB):
            acc = T.alloc_buffer((N, RB), "float32", scope="global")
            part = T.alloc_buffer((R,), "float32", scope="global")
            for n, r in T.grid(N, RB):
                acc[n, r] = T.float32(0)
            for jt in range(J // JT):
                for n in range(N):
                    for rb in range(RB // R):
                        for r in T.unroll(R):
                            part[r] = T.float32(0)
                        for jj in T.unroll(JT):
                            for m in T.unroll(M):
                                for r in T.unroll(R):
                                    part[r] = part[r] + table[jt, n, jj, shape.partition_of(ob * RB + rb * R) * M + m, T.bitwise_and(
                                        T.Cast("int32", codes[ob * RB + rb * R + r, jt * JT + jj, m]), mask)]
                        for r in T.unroll(R):
                            acc[n, rb * R + r] = acc[n, rb * R + r] + part[r]
            for n, r in T.grid(N, RB):
                y[n, ob * RB + r] = T.Cast(act, acc[n, r] * scales[ob * RB + r] + bias[ob * RB + r])

    return kernel
