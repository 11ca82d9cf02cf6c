"""AQLM prompt GEMM on int8 dot products (AVX-512 VNNI `vpdpbusd`) for x86 CPUs with avx512vnni.

Where it sits: the prefill kernel (batch > MAX_GEMV_BATCH) in the kernel table, ahead of the fp32 `gemm_decode`
where the target has avx512vnni. An fp32 GEMM on this kind of CPU runs near its FMA peak at SmolLM2's prompt
shapes (docs N32); llama.cpp's Q2_K/Q4_0/IQ2 prompt multiplies int8 activations by integer weights, 64
multiply-adds per `vpdpbusd` against 16 per fp32 FMA. This kernel does the same with the AQLM weights:

1. Activations, once per call (a parallel loop over tokens): each token's input in groups of GQ = 64 is quantized
   to int8 with a symmetric absmax scale per (token, group). Per group it also keeps 128·Σ xq (see 3).
2. Weights, once per tile of KB inputs × OB rows (each thread-pool task owns OB rows): the tile of Ŵ (before the
   row scale) is decoded to fp32 and quantized to int8 with a symmetric absmax scale per (row, group of 64),
   stored as unsigned (+128) in the VNNI layout wq[k/4, row, 4]: one 64-byte vector = 16 rows × 4 inputs.
3. Micro-kernel (an outer product, as in gemm_decode): NB tokens × RV vectors of 16 rows of int32 accumulators;
   per 4 inputs, RV vector loads of wq and NB `vpdpbusd` each with 4 activation bytes broadcast from memory.
   `vpdpbusd` multiplies unsigned by signed bytes, so Σ (w+128)·x = Σ w·x + 128·Σ x: the second term is
   subtracted per (token, group). At the end of each group the int32 sums become fp32, times
   (row's group scale × token's group scale), added to fp32 accumulators.

Accuracy: the quantization error of (2) and (1) per group of 64 is what llama.cpp's Q8_0 activations carry; its
PPL cost on the SmolLM2 checkpoint is measured in benchmarks/int8_prefill_ppl.py (docs N32). Decode (≤ 8 tokens)
does not use this kernel, so prompt and generated tokens differ only by it.
"""

from __future__ import annotations

from tvm.script import tirx as T

from .gemm_decode import codes_reader
from .gemv_direct import GemvShape, _largest_divisor, tree_max, tree_sum


GQ = 64  # inputs per int8 scale, for activations and weights alike
REQUIRED_FEATURES = ("avx512f", "avx512bw", "avx512vnni")
# Not a CPU feature: the build's consent to quantize prompt activations (`build --prefill int8`, the default). The
# target adds it to the features it hands the kernel table (targets/common.py `kernel_features`).
INT8_ACTIVATIONS = "aqlm-int8-activations"
DPBUSD = "llvm.x86.avx512.vpdpbusd.512"


def vnni_unsupported(shape: GemvShape) -> str | None:
    cfg = shape.config
    if shape.act_dtype != "float32":
        return f"activations {shape.act_dtype}: the int8 GEMM takes fp32"
    if shape.in_features % GQ:
        return f"{shape.in_features} inputs: not a multiple of {GQ}"
    if 64 % cfg.in_group_size:
        return f"group size {cfg.in_group_size} does not divide {GQ}"
    if shape.out_features % 32 or min(shape.out_features, shape.row_quantum) % 32:
        return f"{shape.out_features} rows (partitions {shape.parts}): need blocks of 32"
    return None


def gemm_vnni(shape: GemvShape, out_block: int = 64, k_block: int = 256, token_block: int = 4, row_vectors: int = 2,
              name: str = "aqlm_gemm_vnni", index_dtype: str = "int32", code_layout: str = "out_major"):
    """A TIR PrimFunc `name(x[n, I], codes, codebooks, scales, bias, y[n, O])` for any token count n ≥ 1, the
    signature of kernels/gemm_decode.py `gemm_decode` (same codes layouts)."""
    why = vnni_unsupported(shape)
    if why:
        raise ValueError(f"gemm_vnni {shape.out_features}x{shape.in_features}: {why}")
    cfg = shape.config
    O, I, g, M = shape.out_features, shape.in_features, cfg.in_group_size, cfg.num_codebooks
    cfg.check_shape(O, I)
    J, K, mask = I // g, cfg.codebook_size, cfg.codebook_size - 1
    OB = _largest_divisor(min(O, shape.row_quantum), out_block)
    RV = row_vectors
    RW = 16 * RV
    if OB % RW:
        raise ValueError(f"gemm_vnni: row block {OB} is not a multiple of {RW}")
    NG = I // GQ  # activation groups per token
    KB = GQ * _largest_divisor(NG, max(1, k_block // GQ))
    GB = KB // GQ  # groups per tile
    JG = GQ // g  # AQLM input groups per int8 group
    NB = token_block
    PM = shape.codebook_rows()
    act, cbt, cdt = shape.act_dtype, shape.codebook_dtype, shape.code_dtype
    code = codes_reader("gemm_vnni", shape, OB, code_layout)
    widen = K <= 256

    def decoded(cb, cbf, codes, flat, o, j, t):
        total = T.float32(0)
        for m in range(M):
            c = T.bitwise_and(T.Cast("int32", code(codes, flat, o, j, m)), mask)
            total = total + (cbf[m, c, t] if widen else
                             T.Cast("float32", cb[shape.partition_of(o) * M + m, c, t]))
        return total

    def to_int32(v):  # vcvtps2dq: round to nearest even in one instruction
        return T.call_llvm_pure_intrin("int32x16", "llvm.x86.avx512.mask.cvtps2dq.512", v,
                                       T.Broadcast(T.int32(0), 16), T.int16(-1), T.int32(4))

    @T.prim_func
    def kernel(x_h: T.handle, codes: T.Buffer((O, J, M), cdt), cb: T.Buffer((PM, K, g), cbt),
               scales: T.Buffer((O,), "float32"), bias: T.Buffer((O,), "float32"), y_h: T.handle):
        T.func_attr({"global_symbol": name, "tirx.noalias": True})
        n_tok = T.int64() if index_dtype == "int64" else T.int32()
        x = T.match_buffer(x_h, (n_tok, I), act)
        y = T.match_buffer(y_h, (n_tok, O), act)
        flat = T.decl_buffer((O * J * M,), cdt, data=codes.data)
        xq = T.alloc_buffer((n_tok * I,), "int8", scope="global")
        xq32 = T.decl_buffer((n_tok * (I // 4),), "int32", data=xq.data)
        sx = T.alloc_buffer((n_tok * NG,), "float32", scope="global")
        corr = T.alloc_buffer((n_tok * NG,), "int32", scope="global")
        # 1. activations to int8, per (token, group of GQ)
        for n in T.parallel(n_tok):
            m16 = T.alloc_buffer((16,), "float32", scope="global")
            s16 = T.alloc_buffer((16,), "int32", scope="global")
            for gi in range(NG):
                for v in T.vectorized(16):
                    m16[v] = tree_max([T.fabs(T.Cast("float32", x[n, gi * GQ + c * 16 + v])) for c in range(GQ // 16)])
                amax = tree_max([m16[v] for v in range(16)])
                inv = T.Select(amax > T.float32(0), T.float32(127) / amax, T.float32(0))
                sx[n * NG + gi] = amax / T.float32(127)
                for c in range(GQ // 16):
                    xq[T.Ramp(n * I + gi * GQ + c * 16, 1, 16)] = T.Cast("int8x16", to_int32(
                        T.Cast("float32x16", x[n, T.Ramp(gi * GQ + c * 16, 1, 16)]) * T.Broadcast(inv, 16)))
                for v in T.vectorized(16):
                    s16[v] = tree_sum([T.Cast("int32", xq[n * I + gi * GQ + c * 16 + v]) for c in range(GQ // 16)])
                corr[n * NG + gi] = tree_sum([s16[v] for v in range(16)]) * 128
        # 2.-3. per block of OB rows: decode and quantize a tile of Ŵ, then every token multiplies it
        for ob in T.parallel(O // OB):
            cbf = T.alloc_buffer((M, K if widen else 1, g), "float32", scope="global")
            for m, c in T.grid(M, K if widen else 0):
                for t in T.vectorized(g):
                    cbf[m, c, t] = T.Cast("float32", cb[shape.partition_of(ob * OB) * M + m, c, t])
            wq = T.alloc_buffer((KB * OB,), "uint8", scope="global")  # [KB/4, OB, 4]
            sw = T.alloc_buffer((GB * OB,), "float32", scope="global")  # [GB, OB]
            wf = T.alloc_buffer((GQ,), "float32", scope="global")
            m16w = T.alloc_buffer((16,), "float32", scope="global")
            wi = T.alloc_buffer((GQ,), "int32", scope="global")
            acc_y = T.alloc_buffer((n_tok * OB,), "float32", scope="global")
            iacc = T.alloc_buffer((NB * RW,), "int32", scope="global")
            facc = T.alloc_buffer((NB * RW,), "float32", scope="global")
            for i in range(n_tok * OB):
                acc_y[i] = T.float32(0)
            for kb in range(I // KB):
                for o, gb in T.grid(OB, GB):
                    for jj in range(JG):
                        for t in T.vectorized(g):
                            wf[jj * g + t] = decoded(cb, cbf, codes, flat, ob * OB + o, (kb * GB + gb) * JG + jj, t)
                    for v in T.vectorized(16):
                        m16w[v] = tree_max([T.fabs(wf[c * 16 + v]) for c in range(GQ // 16)])
                    wmax = tree_max([m16w[v] for v in range(16)])
                    winv = T.Select(wmax > T.float32(0), T.float32(127) / wmax, T.float32(0))
                    sw[gb * OB + o] = wmax / T.float32(127)
                    for c in range(GQ // 16):
                        wi[T.Ramp(c * 16, 1, 16)] = to_int32(wf[T.Ramp(c * 16, 1, 16)] * T.Broadcast(winv, 16)) \
                            + T.Broadcast(T.int32(128), 16)
                    for q in range(GQ // 4):
                        for t in T.vectorized(4):
                            wq[((gb * (GQ // 4) + q) * OB + o) * 4 + t] = T.Cast("uint8", wi[q * 4 + t])
                for nb in range((n_tok + NB - 1) // NB):
                    for rv in range(OB // RW):
                        for n in T.unroll(NB):
                            for v in T.vectorized(RW):
                                facc[n * RW + v] = acc_y[T.min(nb * NB + n, n_tok - 1) * OB + rv * RW + v]
                        for gb in range(GB):
                            for n in T.unroll(NB):
                                for v in T.vectorized(RW):
                                    iacc[n * RW + v] = 0
                            for q in range(GQ // 4):
                                for n in T.unroll(NB):
                                    for r in T.unroll(RV):
                                        iacc[T.Ramp(n * RW + r * 16, 1, 16)] = T.call_llvm_pure_intrin(
                                            "int32x16", DPBUSD, iacc[T.Ramp(n * RW + r * 16, 1, 16)],
                                            wq[T.Ramp(((gb * (GQ // 4) + q) * OB + rv * RW + r * 16) * 4, 1, 64)],
                                            T.reinterpret("int8x64", T.Broadcast(xq32[
                                                T.min(nb * NB + n, n_tok - 1) * (I // 4)
                                                + (kb * KB + gb * GQ) // 4 + q], 16)))
                            for n in T.unroll(NB):
                                for v in T.vectorized(RW):
                                    facc[n * RW + v] = facc[n * RW + v] + T.Cast("float32", (
                                        iacc[n * RW + v] - corr[T.min(nb * NB + n, n_tok - 1) * NG + kb * GB + gb])) * (
                                        sw[gb * OB + rv * RW + v] * sx[T.min(nb * NB + n, n_tok - 1) * NG + kb * GB + gb])
                        for n in T.unroll(NB):
                            if nb * NB + n < n_tok:
                                for v in T.vectorized(RW):
                                    acc_y[(nb * NB + n) * OB + rv * RW + v] = facc[n * RW + v]
            for n, o in T.grid(n_tok, OB):
                y[n, ob * OB + o] = T.Cast(act, acc_y[n * OB + o] * scales[ob * OB + o] + bias[ob * OB + o])

    return kernel
