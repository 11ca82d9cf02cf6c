"""Decode-then-multiply AQLM GEMM for CPUs (prefill: any number of tokens N, symbolic).

Schedule: output rows are split into blocks of OB rows for the thread pool; for each block, the input dimension is
walked in tiles of KB. A tile of Ŵ (OB × KB fp32, decoded with contiguous vector stores) is built once and stays
in L1/L2, then multiplied with every token: the micro-kernel keeps NB tokens × RO rows of V-wide partial dot
products as accumulators (NB + RO vector loads per NB·RO FMAs), so each decoded weight is reused N times and the
decode cost, which the GEMV pays per token, is paid once per call. V-lane partial sums live in an fp32 buffer [N, OB, V] per block (one horizontal sum per output at the end), so
fp16 activations still accumulate in fp32.
"""

from __future__ import annotations

from tvm.script import tirx as T

from .gemv_direct import GemvShape, _largest_divisor


def gemm_decode(shape: GemvShape, out_block: int = 64, k_block: int = 128, token_block: int = 4, rows: int = 4, vector: int = 16,
                name: str = "aqlm_gemm", index_dtype: str = "int32", code_layout: str = "out_major"):
    """A TIR PrimFunc `name(x[n, I], codes, codebooks, scales, bias, y[n, O])` for any token count n ≥ 1
    (`shape.batch` is ignored). `code_layout`: "out_major" (HF codes[O, I/g, M]) or "row_tiled64" (the same tensor
    holding [O/64, I/g, M, 64]: kernels/gemv_lut_vbmi.py; the decode function's LUT kernel reads it, and both
    functions share the codes)."""
    cfg = shape.config
    O, I, g, M = shape.out_features, shape.in_features, cfg.in_group_size, cfg.num_codebooks
    cfg.check_shape(O, I)
    J, K, mask = I // g, cfg.codebook_size, cfg.codebook_size - 1
    OB = _largest_divisor(min(O, shape.row_quantum), out_block)
    PM = shape.codebook_rows()
    RO = _largest_divisor(OB, rows)
    KB = g * _largest_divisor(J, max(1, k_block // g))
    V = _largest_divisor(KB, vector)
    JB = KB // g
    NB = token_block
    act, cbt, cdt = shape.act_dtype, shape.codebook_dtype, shape.code_dtype
    tiled = code_layout == "row_tiled64"
    if tiled and (O % 64 or OB % 64):
        raise ValueError(f"gemm_decode {O}x{I}: row-tiled codes need rows and row blocks in multiples of 64")
    if code_layout not in ("out_major", "row_tiled64"):
        raise ValueError(f"gemm_decode: unknown codes layout {code_layout!r}")

    def code(codes, flat, o, j, m):
        if tiled:  # o = ob·OB + row: its tile and lane
            return flat[(o // 64) * (J * M * 64) + j * (M * 64) + m * 64 + o % 64]
        return codes[o, j, m]

    @T.prim_func
    def kernel(x_h: T.handle, codes: T.Buffer((O, J, M), cdt), cb: T.Buffer((PM, K, g), cbt),
               scales: T.Buffer((O,), "float32"), bias: T.Buffer((O,), "float32"), y_h: T.handle):
        T.func_attr({"global_symbol": name, "tirx.noalias": True})
        n_tok = T.int64() if index_dtype == "int64" else T.int32()  # Relax passes int64 shape variables
        x = T.match_buffer(x_h, (n_tok, I), act)
        y = T.match_buffer(y_h, (n_tok, O), act)
        flat = T.decl_buffer((O * J * M,), cdt, data=codes.data)
        for ob in T.parallel(O // OB):
            w = T.alloc_buffer((OB, KB), "float32", scope="global")
            acc_y = T.alloc_buffer((n_tok, OB, V), "float32", scope="global")
            acc = T.alloc_buffer((NB, RO, V), "float32", scope="global")
            for n, o in T.grid(n_tok, OB):
                for v in T.vectorized(V):
                    acc_y[n, o, v] = T.float32(0)
            for kb in range(I // KB):
                for o, jj in T.grid(OB, JB):
                    for t in T.vectorized(g):
                        w[o, jj * g + t] = T.Cast("float32", cb[shape.partition_of(ob * OB) * M, T.bitwise_and(
                            T.Cast("int32", code(codes, flat, ob * OB + o, kb * JB + jj, 0)), mask), t])
                    for m in range(1, M):
                        for t in T.vectorized(g):
                            w[o, jj * g + t] = w[o, jj * g + t] + T.Cast("float32", cb[shape.partition_of(ob * OB) * M + m, T.bitwise_and(
                                T.Cast("int32", code(codes, flat, ob * OB + o, kb * JB + jj, m)), mask), t])
                for nb in range((n_tok + NB - 1) // NB):
                    for orow in range(OB // RO):
                        for n, r in T.grid(NB, RO):
                            for v in T.vectorized(V):
                                acc[n, r, v] = T.float32(0)
                        for kv in range(KB // V):
                            for n in T.unroll(NB):
                                for r in T.unroll(RO):
                                    for v in T.vectorized(V):
                                        # tokens past the end read the last row again; their sums are never stored
                                        acc[n, r, v] = acc[n, r, v] + T.Cast("float32", x[
                                            T.min(nb * NB + n, n_tok - 1), kb * KB + kv * V + v]) * w[orow * RO + r, kv * V + v]
                        for n in T.unroll(NB):
                            if nb * NB + n < n_tok:
                                for r in T.unroll(RO):
                                    for v in T.vectorized(V):
                                        acc_y[nb * NB + n, orow * RO + r, v] = acc_y[nb * NB + n, orow * RO + r, v] + acc[n, r, v]
            for n, o in T.grid(n_tok, OB):
                s = T.alloc_buffer((1,), "float32", scope="global")
                s[0] = T.float32(0)
                for v in range(V):
                    s[0] = s[0] + acc_y[n, o, v]
                y[n, ob * OB + o] = T.Cast(act, s[0] * scales[ob * OB + o] + bias[ob * OB + o])

    return kernel
