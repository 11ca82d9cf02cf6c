"""Decode-then-multiply AQLM GEMM for CPUs (prefill: any number of tokens N, symbolic).

Schedule: output rows are split into blocks of OB rows for the thread pool; for each block the input dimension is
walked in tiles of KB. A tile of Ŵ is decoded once, **transposed** (Ŵᵀ[KB, OB]: for one input index, the OB rows'
weights are contiguous), and stays in L1/L2; then every token reuses it. The micro-kernel is an outer product, as
in BLAS: NB tokens × RW rows (RW = 4 vectors) of accumulators in registers; per input index it loads RW/V vectors
of Ŵᵀ, broadcasts NB activations and issues NB·RW/V fused multiply-adds — no horizontal sums, and the partial
outputs of a tile are added to an fp32 [N, OB] buffer once per tile. The earlier schedule (dot products along the
input, V-lane partial sums per output, a horizontal sum at the end) ran SmolLM2's prefill linears at ≈ 45% of this
CPU's fp32 peak. The decode cost, which the GEMV pays per token, is paid once per call.
"""

from __future__ import annotations

from tvm.script import tirx as T

from .gemv_direct import GemvShape, _largest_divisor


OUTER_PRODUCT_FROM = 64  # tokens: below this the transposed decode (≈ 0.45 ms for 1536×576) costs more than it saves


# the 8×8 transpose's two-input shuffles (lanes 0-7 the first vector, 8-15 the second)
UNPACK_LO, UNPACK_HI = [0, 8, 1, 9, 4, 12, 5, 13], [2, 10, 3, 11, 6, 14, 7, 15]
PAIRS_LO, PAIRS_HI = [0, 1, 8, 9, 4, 5, 12, 13], [2, 3, 10, 11, 6, 7, 14, 15]
HALVES_LO, HALVES_HI = [0, 1, 2, 3, 8, 9, 10, 11], [4, 5, 6, 7, 12, 13, 14, 15]


def codes_reader(kernel: str, shape: GemvShape, row_block: int, code_layout: str):
    """code(codes, flat, o, j, m) → the code of row o, input group j, codebook m, as a TIR expression, for codes
    stored "out_major" (HF codes[O, I/g, M]) or "row_tiled64" (the same tensor holding [O/64, I/g, M, 64], read
    through `flat`, its 1-D view). Raises for a layout the shape or the row block cannot take."""
    O, I = shape.out_features, shape.in_features
    J, M = I // shape.config.in_group_size, shape.config.num_codebooks
    if code_layout not in ("out_major", "row_tiled64"):
        raise ValueError(f"{kernel}: unknown codes layout {code_layout!r}")
    tiled = code_layout == "row_tiled64"
    if tiled and (O % 64 or row_block % 64):
        raise ValueError(f"{kernel} {O}x{I}: row-tiled codes need rows and row blocks in multiples of 64")

    def code(codes, flat, o, j, m):
        if tiled:  # o = ob·OB + row: its tile and lane
            return flat[(o // 64) * (J * M * 64) + j * (M * 64) + m * 64 + o % 64]
        return codes[o, j, m]

    return code


def gemm_decode(shape: GemvShape, out_block: int = 64, k_block: int = 256, token_block: int = 6, vector: int = 16,
                name: str = "aqlm_gemm", index_dtype: str = "int32", code_layout: str = "out_major",
                outer_product_from: int = OUTER_PRODUCT_FROM, row_vectors: int = 4, transpose_8x8: bool = False):
    """A TIR PrimFunc `name(x[n, I], codes, codebooks, scales, bias, y[n, O])` for any token count n ≥ 1
    (`shape.batch` is ignored). `code_layout`: "out_major" (HF codes[O, I/g, M]) or "row_tiled64" (the same tensor
    holding [O/64, I/g, M, 64]: kernels/gemv_lut_vbmi.py; the decode function's LUT kernel reads it, and both
    functions share the codes).

    Two schedules in one function, chosen by n at run time: from `outer_product_from` tokens the outer-product
    micro-kernel over a transposed tile (NB = `token_block` tokens × 4 vectors of rows: 24 of AVX-512's 32
    registers); below it the tile is decoded row-major (contiguous vector stores: cheaper to build) and each output
    is a dot product along the input, V-lane partial sums added up once at the end (RO rows × 4 tokens).

    `transpose_8x8` (8-dim groups, fp32 codebook copies): the transposed tile is written 8 rows × 8 inputs at a time —
    the 8 rows' codewords loaded as vectors and added, transposed in registers by the 24 two-input shuffles of the
    classic AVX 8×8 transpose (unpack, shufps, vperm2f128), 8 vector stores. Per weight written straight into Ŵᵀ,
    LLVM gathers the 8 rows' entries for each input with `vinsertps` (2 shuffles a weight with M = 2): ≈ 20% of a
    128-token 1536×576 GEMM on Zen 3."""
    cfg = shape.config
    O, I, g, M = shape.out_features, shape.in_features, cfg.in_group_size, cfg.num_codebooks
    cfg.check_shape(O, I)
    J, K, mask = I // g, cfg.codebook_size, cfg.codebook_size - 1
    OB = _largest_divisor(min(O, shape.row_quantum), out_block)
    PM = shape.codebook_rows()
    RW = _largest_divisor(OB, row_vectors * vector)  # outer product: rows of one micro-kernel
    KB = g * _largest_divisor(J, max(1, k_block // g))
    JB = KB // g
    NB = token_block
    # dot-product schedule (few tokens)
    RO = _largest_divisor(OB, 4)
    KS = g * _largest_divisor(J, max(1, 128 // g))
    JS = KS // g
    V = _largest_divisor(KS, vector)
    NS = 4
    act, cbt, cdt = shape.act_dtype, shape.codebook_dtype, shape.code_dtype
    code = codes_reader("gemm_decode", shape, OB, code_layout)

    # Small codebooks (up to 8 bits) are widened to fp32 once per task, so decoding a tile is plain loads and adds;
    # a 16-bit codebook (65536 × g per codebook) would cost more to widen than the tile's lookups save.
    widen = K <= 256
    blocked = transpose_8x8 and widen and g == 8 and OB % 8 == 0

    def decoded(cb, cbf, codes, flat, ob, o, j, t):
        """Ŵ[ob·OB + o, j·g + t] before its row scale: the sum of the M codewords' entries t (from the fp32 copy
        of the block's partition's codebooks where there is one)."""
        total = T.float32(0)
        for m in range(M):
            c = T.bitwise_and(T.Cast("int32", code(codes, flat, ob * OB + o, j, m)), mask)
            total = total + (cbf[m, c, t] if widen else
                             T.Cast("float32", cb[shape.partition_of(ob * OB) * M + m, c, t]))
        return total

    def codeword_vector(cbf, codes, flat, o, j):
        """Ŵ[o, 8j : 8j + 8] before its row scale, as an 8-lane vector: the sum of row o's M widened codewords."""
        total = None
        for m in range(M):
            v = cbf[m, T.bitwise_and(T.Cast("int32", code(codes, flat, o, j, m)), mask), T.ramp(0, 1, 8)]
            total = v if total is None else total + v
        return total

    @T.prim_func
    def kernel(x_h: T.handle, codes: T.Buffer((O, J, M), cdt), cb: T.Buffer((PM, K, g), cbt),
               scales: T.Buffer((O,), "float32"), bias: T.Buffer((O,), "float32"), y_h: T.handle):
        T.func_attr({"global_symbol": name, "tirx.noalias": True})
        n_tok = T.int64() if index_dtype == "int64" else T.int32()  # Relax passes int64 shape variables
        x = T.match_buffer(x_h, (n_tok, I), act)
        y = T.match_buffer(y_h, (n_tok, O), act)
        flat = T.decl_buffer((O * J * M,), cdt, data=codes.data)
        for ob in T.parallel(O // OB):
            cbf = T.alloc_buffer((M, K if widen else 1, g), "float32", scope="global")
            for m, c in T.grid(M, K if widen else 0):
                for t in T.vectorized(g):
                    cbf[m, c, t] = T.Cast("float32", cb[shape.partition_of(ob * OB) * M + m, c, t])
            if n_tok >= outer_product_from:
                wt = T.alloc_buffer((KB, OB), "float32", scope="global")
                acc_y = T.alloc_buffer((n_tok, OB), "float32", scope="global")
                acc = T.alloc_buffer((NB, RW), "float32", scope="global")
                for n in range(n_tok):
                    for o in T.vectorized(OB):
                        acc_y[n, o] = T.float32(0)
                for kb in range(I // KB):
                    if blocked:
                        st = T.alloc_buffer((24, 8), "float32", scope="local")  # the transpose's 3 stages
                        for jj, o8 in T.grid(JB, OB // 8):
                            for r in T.unroll(8):
                                st[r, T.ramp(0, 1, 8)] = codeword_vector(cbf, codes, flat, ob * OB + o8 * 8 + r,
                                                                         kb * JB + jj)
                            for i in T.unroll(4):  # unpacklo/hi of row pairs
                                st[8 + 2 * i, T.ramp(0, 1, 8)] = T.Shuffle(
                                    [st[2 * i, T.ramp(0, 1, 8)], st[2 * i + 1, T.ramp(0, 1, 8)]], UNPACK_LO)
                                st[9 + 2 * i, T.ramp(0, 1, 8)] = T.Shuffle(
                                    [st[2 * i, T.ramp(0, 1, 8)], st[2 * i + 1, T.ramp(0, 1, 8)]], UNPACK_HI)
                            for h in T.unroll(2):  # shufps of pair pairs
                                for i in T.unroll(2):
                                    st[16 + 4 * h + 2 * i, T.ramp(0, 1, 8)] = T.Shuffle(
                                        [st[8 + 4 * h + i, T.ramp(0, 1, 8)], st[10 + 4 * h + i, T.ramp(0, 1, 8)]],
                                        PAIRS_LO)
                                    st[17 + 4 * h + 2 * i, T.ramp(0, 1, 8)] = T.Shuffle(
                                        [st[8 + 4 * h + i, T.ramp(0, 1, 8)], st[10 + 4 * h + i, T.ramp(0, 1, 8)]],
                                        PAIRS_HI)
                            for i in T.unroll(4):  # vperm2f128 of the two halves: input jj·8 + i and + i + 4
                                wt[jj * g + i, T.ramp(o8 * 8, 1, 8)] = T.Shuffle(
                                    [st[16 + i, T.ramp(0, 1, 8)], st[20 + i, T.ramp(0, 1, 8)]], HALVES_LO)
                                wt[jj * g + i + 4, T.ramp(o8 * 8, 1, 8)] = T.Shuffle(
                                    [st[16 + i, T.ramp(0, 1, 8)], st[20 + i, T.ramp(0, 1, 8)]], HALVES_HI)
                    else:
                        for jj, o in T.grid(JB, OB):
                            for t in T.unroll(g):
                                wt[jj * g + t, o] = decoded(cb, cbf, codes, flat, ob, o, kb * JB + jj, t)
                    for nb in range((n_tok + NB - 1) // NB):
                        for rw in range(OB // RW):
                            for n in T.unroll(NB):
                                for o in T.vectorized(RW):
                                    acc[n, o] = acc_y[T.min(nb * NB + n, n_tok - 1), rw * RW + o]
                            for k in range(KB):
                                for n in T.unroll(NB):
                                    for o in T.vectorized(RW):
                                        # tokens past the end read the last row again; their sums are never stored
                                        acc[n, o] = acc[n, o] + T.Cast("float32", x[T.min(nb * NB + n, n_tok - 1),
                                                                                      kb * KB + k]) * wt[k, rw * RW + o]
                            for n in T.unroll(NB):
                                if nb * NB + n < n_tok:
                                    for o in T.vectorized(RW):
                                        acc_y[nb * NB + n, rw * RW + o] = acc[n, o]
                for n, o in T.grid(n_tok, OB):
                    y[n, ob * OB + o] = T.Cast(act, acc_y[n, o] * scales[ob * OB + o] + bias[ob * OB + o])
            else:
                w = T.alloc_buffer((OB, KS), "float32", scope="global")
                lanes = T.alloc_buffer((n_tok, OB, V), "float32", scope="global")
                part = T.alloc_buffer((NS, RO, V), "float32", scope="global")
                for n, o in T.grid(n_tok, OB):
                    for v in T.vectorized(V):
                        lanes[n, o, v] = T.float32(0)
                for kb in range(I // KS):
                    for o, jj in T.grid(OB, JS):
                        for t in T.vectorized(g):
                            w[o, jj * g + t] = decoded(cb, cbf, codes, flat, ob, o, kb * JS + jj, t)
                    for nb in range((n_tok + NS - 1) // NS):
                        for orow in range(OB // RO):
                            for n, r in T.grid(NS, RO):
                                for v in T.vectorized(V):
                                    part[n, r, v] = T.float32(0)
                            for kv in range(KS // V):
                                for n in T.unroll(NS):
                                    for r in T.unroll(RO):
                                        for v in T.vectorized(V):
                                            part[n, r, v] = part[n, r, v] + T.Cast("float32", x[
                                                T.min(nb * NS + n, n_tok - 1), kb * KS + kv * V + v]) * \
                                                w[orow * RO + r, kv * V + v]
                            for n in T.unroll(NS):
                                if nb * NS + n < n_tok:
                                    for r in T.unroll(RO):
                                        for v in T.vectorized(V):
                                            lanes[nb * NS + n, orow * RO + r, v] = \
                                                lanes[nb * NS + n, orow * RO + r, v] + part[n, r, v]
                for n, o in T.grid(n_tok, OB):
                    total = T.alloc_buffer((1,), "float32", scope="global")
                    total[0] = T.float32(0)
                    for v in range(V):
                        total[0] = total[0] + lanes[n, o, v]
                    y[n, ob * OB + o] = T.Cast(act, total[0] * scales[ob * OB + o] + bias[ob * OB + o])

    return kernel
