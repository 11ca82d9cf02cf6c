"""Direct-decode AQLM GEMV for x86 CPUs with AVX2 and no AVX-512 (decode: built for batch 1–8, chosen by the kernel
table at batch 1 only), for 8-dim codewords of codebooks of at most 256 entries (2x8g8, 1x8g8, 4x8g8 …).

The AVX2 LUT kernels (`gemv_lut`, `gemv_lut_split`) add one scalar fp32 table entry per codebook per group of 8
weights: on a Zen 3 VM (2 vCPUs) the 4096² 2x8g8 GEMV took ≈ 2 ms on 2 threads — 8.5 G weights/s, ≈ 1/14 of the
byte-permute kernel on Zen 4 — and `gemv_direct` decodes fp16 codewords one weight at a time. Without a byte
permute over 256 entries (AVX-512 VBMI) a table of 256 partial sums has no fast lookup, so this kernel decodes
instead, the way llama.cpp's AVX2 code decodes its codebook types (IQ2_XXS: an 8-bit index into a grid of 8-value
codewords), in integers:

- The codebooks are rounded to int16 with one scale per partition, s = Σ_m max|C_m| / 2046, so the sum of a group's
  M codewords stays within about 12 bits (|Σ_m round(C_m/s)| ≤ 2046 + M/2): at build time where they are a parameter
  (`prepared_codebooks`, `prepared=True`), else in each call.
- x is rounded to int16 in blocks of `x_block` inputs, each with its own scale max|x| / 2047 (12 bits), so one
  outlier costs only its block.
- Per output row and 16 inputs (two groups): two 16-byte codeword loads per codebook (one `vmovdqu` each: a codeword
  of 8 int16 is one xmm), the M codewords added (`vpaddw`), the two groups joined (`vinserti128`), one `vpmaddwd`
  against the int16 x. The products summed over 64 inputs stay below 2^29 in the int32 lanes; each
  block's int32 sums are converted and scaled into fp32 accumulators.
- Rows go to the thread pool in blocks (`tasks` of them where the rows allow; a block never straddles two
  partitions of a fused layer). No table is shared, so no cache line moves between cores.

Error: the 12-bit codebooks and activations give ≈ 1e-3 of the output's scale (the fp32 reference is `gemv_direct`;
tests/kernels/test_gemv_i16_avx2.py bounds it); the end-to-end check is the decode A/B's logits and argmax and the
PPL through the kernels (docs/tvm-and-ort-notes.md N41).
"""

from __future__ import annotations

import numpy as np
from tvm.script import tirx as T

from .gemv_direct import GemvShape, _largest_divisor

REQUIRED_FEATURES = ("avx2",)
QMAX = 2047  # 12-bit codeword sums and activations: 64 products of two sum below 2^29


def unsupported(shape: GemvShape) -> str | None:
    """None when the kernel can compute `shape` (any batch it is built for; the registry bounds it), else why not."""
    cfg = shape.config
    if cfg.in_group_size != 8:
        return f"groups of {cfg.in_group_size}: a codeword of 8 int16 is one 16-byte load"
    if cfg.codebook_size > 256:
        return f"codebooks of {cfg.codebook_size} entries: an int16 copy would not stay in L1"
    if cfg.num_codebooks > 8:
        return f"{cfg.num_codebooks} codebooks: their 12-bit sum would leave each fewer than 9 bits"
    if shape.in_features % x_block_for(shape.in_features):
        return f"in {shape.in_features}: not a multiple of 16"
    return None


def x_block_for(in_features: int) -> int:
    """Inputs per activation scale: 64 where they divide the row, else 32 or 16."""
    return next((b for b in (64, 32, 16) if in_features % b == 0), 64)


def prepared_codebooks(codebooks: np.ndarray, partitions: int = 1) -> np.ndarray:
    """The codebooks as `gemv_i16_avx2(prepared=True)` reads them, from fp16 codebooks [P·M, K, 8] of `partitions`
    partitions: int16 [P·M·K·8 + 2P] = the 12-bit codewords (each rounded from C / s, s = Σ_m max|C_m| / 2046 of its
    partition, in fp32 as the kernel computes them), then the P scales s as fp32 bits. Every call would otherwise
    round them again (≈ 4096 values per partition, single-threaded, before the rows start)."""
    cb = np.asarray(codebooks)
    if cb.ndim != 3 or cb.shape[0] % partitions:
        raise ValueError(f"codebooks: expected [P·M, K, g] with P = {partitions}, found shape {list(cb.shape)}")
    m = cb.shape[0] // partitions
    c32 = cb.astype(np.float32)
    q = np.empty(c32.shape, np.int16)
    s = np.empty(partitions, np.float32)
    for p in range(partitions):
        block = c32[p * m:(p + 1) * m]
        tot = np.float32(0)
        for i in range(m):
            tot = np.float32(tot + np.abs(block[i]).max())
        s[p] = np.float32(max(tot, np.float32(1e-30)) / np.float32(QMAX - 1))
        # times the fp32 reciprocal, half to even: as the kernel's vector rounding
        q[p * m:(p + 1) * m] = np.rint(block * (np.float32(1) / s[p])).astype(np.int16)
    return np.concatenate([q.ravel(), s.view(np.int16)])


def gemv_i16_avx2(shape: GemvShape, tasks: int = 8, x_block: int | None = None, prepared: bool = False,
                  name: str = "aqlm_gemv_i16_avx2"):
    """A TIR PrimFunc with `gemv_direct`'s signature: (x[N, I], codes[O, I/8, M] (HF layout), codebooks[P·M, K, 8]
    fp16, scales[O] fp32, bias[O] fp32, y[N, O]). `tasks`: row blocks for the thread pool (at most; fewer where the
    rows do not divide). `prepared`: the codebooks argument is `prepared_codebooks` of them (int16 [P·M·K·8 + 2P])."""
    why = unsupported(shape)
    if why:
        raise ValueError(f"gemv_i16_avx2: {why}")
    cfg = shape.config
    O, I, N, g, M = shape.out_features, shape.in_features, shape.batch, cfg.in_group_size, cfg.num_codebooks
    J, K = I // g, cfg.codebook_size
    XBL = x_block or x_block_for(I)
    if I % XBL or XBL % 16 or XBL > 64:
        raise ValueError(f"x_block {XBL}: expected a multiple of 16, at most 64, dividing in {I}")
    PM = shape.codebook_rows()
    P = PM // M
    CB, XB = XBL // 16, I // XBL  # 16-input chunks per activation block, blocks per row
    RB = _largest_divisor(min(O, shape.row_quantum), max(1, O // tasks))
    act, cbt, cdt = shape.act_dtype, shape.codebook_dtype, shape.code_dtype
    mask = K - 1
    NQ = PM * K * g  # int16 codeword values; a prepared codebooks argument has the P fp32 scales after them
    CB_SHAPE, CB_DTYPE = ((NQ + 2 * P,), "int16") if prepared else ((PM, K, g), cbt)
    round_codebooks = _round_codebooks(P, M, K, g)

    @T.prim_func
    def kernel(x: T.Buffer((N, I), act), codes: T.Buffer((O, J, M), cdt), cb: T.Buffer(CB_SHAPE, CB_DTYPE),
               scales: T.Buffer((O,), "float32"), bias: T.Buffer((O,), "float32"), y: T.Buffer((N, O), act)):
        T.func_attr({"global_symbol": name, "tirx.noalias": True})
        if prepared:
            cbq = T.decl_buffer((NQ,), "int16", data=cb.data)
            cscale = T.decl_buffer((P,), "float32", data=cb.data, elem_offset=NQ // 2)
        else:
            cbq = T.alloc_buffer((NQ,), "int16", scope="global")
            cscale = T.alloc_buffer((P,), "float32", scope="global")
            round_codebooks(cb, cbq, cscale)
        xq = T.alloc_buffer((N, I), "int16", scope="global")
        xs = T.alloc_buffer((N, XB), "float32", scope="global")
        # each row block's accumulators, allocated once per call: a buffer allocated inside the parallel loop is
        # placed where its uses meet (the row loop's body), a workspace allocation and release per row
        accf_all = T.alloc_buffer((O // RB, N, 8), "float32", scope="global")
        acci_all = T.alloc_buffer((O // RB, N, 8), "int32", scope="global")
        for n, b in T.grid(N, XB):
            mxx = T.alloc_buffer((1,), "float32", scope="local")
            mxx[0] = T.float32(1e-30)
            for i in range(XBL):
                mxx[0] = T.max(mxx[0], T.fabs(T.Cast("float32", x[n, b * XBL + i])))
            xs[n, b] = mxx[0] / T.float32(QMAX)
            for i in range(XBL):
                xq[n, b * XBL + i] = T.Cast("int16", T.round(T.Cast("float32", x[n, b * XBL + i]) / xs[n, b]))
        for ob in T.parallel(O // RB):
            for r in range(RB):
                for n in range(N):
                    accf_all[ob, n, T.ramp(0, 1, 8)] = T.Broadcast(T.float32(0), 8)
                for b in range(XB):
                    for n in range(N):
                        acci_all[ob, n, T.ramp(0, 1, 8)] = T.Broadcast(T.int32(0), 8)
                    for cc in range(CB):
                        for n in range(N):
                            # the two groups' codewords, each the sum of its M codebooks' (int16x8), joined — in the
                            # call itself: bound to a name, the vector would live in a workspace allocated per row
                            acci_all[ob, n, T.ramp(0, 1, 8)] = acci_all[ob, n, T.ramp(0, 1, 8)] + T.call_llvm_pure_intrin(
                                "int32x8", "llvm.x86.avx2.pmadd.wd", T.Shuffle([
                                    _codeword_sum(cbq, codes, ob * RB + r, (b * CB + cc) * 2 + q,
                                                  shape.partition_of(ob * RB) * M, M, K, mask)
                                    for q in range(2)], list(range(16))),
                                xq[n, T.ramp((b * CB + cc) * 16, 1, 16)])
                    for n in range(N):
                        accf_all[ob, n, T.ramp(0, 1, 8)] = accf_all[ob, n, T.ramp(0, 1, 8)] + T.Cast(
                            "float32x8", acci_all[ob, n, T.ramp(0, 1, 8)]) * T.Broadcast(xs[n, b], 8)
                for n in range(N):
                    y[n, ob * RB + r] = T.Cast(act, (((accf_all[ob, n, 0] + accf_all[ob, n, 1]) + (accf_all[ob, n, 2] + accf_all[ob, n, 3])) + (
                        (accf_all[ob, n, 4] + accf_all[ob, n, 5]) + (accf_all[ob, n, 6] + accf_all[ob, n, 7]))) * cscale[shape.partition_of(ob * RB)]
                        * scales[ob * RB + r] + bias[ob * RB + r])

    return kernel


def _codeword_sum(cbq, codes, o, j, pm0, M: int, K: int, mask: int):
    """Σ_m the int16 codeword of codebook pm0 + m that row o's code for group j selects (int16x8)."""
    terms = [cbq[T.ramp(((pm0 + m) * K + T.bitwise_and(T.Cast("int32", codes[o, j, m]), mask)) * 8, 1, 8)]
             for m in range(M)]
    total = terms[0]
    for t in terms[1:]:
        total = total + t
    return total


def _round_codebooks(P: int, M: int, K: int, g: int):
    """A TIR macro: the codebooks rounded in the call (what `prepared_codebooks` does once), 8 values per vector."""

    @T.macro
    def rounding(cb, cbq, cscale):
        for p in range(P):
            tot = T.alloc_buffer((1,), "float32", scope="local")
            mx = T.alloc_buffer((g,), "float32", scope="local")
            inv = T.alloc_buffer((1,), "float32", scope="local")
            tot[0] = T.float32(0)
            for m in range(M):
                mx[T.ramp(0, 1, g)] = T.Broadcast(T.float32(0), g)
                for k in range(K):
                    mx[T.ramp(0, 1, g)] = T.max(mx[T.ramp(0, 1, g)], T.fabs(T.Cast(
                        f"float32x{g}", cb[p * M + m, k, T.ramp(0, 1, g)])))
                tot[0] = tot[0] + _lanes_max([mx[t] for t in range(g)])
            cscale[p] = T.max(tot[0], T.float32(1e-30)) / T.float32(QMAX - 1)
            inv[0] = T.float32(1) / cscale[p]
            for m, k in T.grid(M, K):
                cbq[T.ramp(((p * M + m) * K + k) * g, 1, g)] = T.Cast(f"int16x{g}", T.round(T.Cast(
                    f"float32x{g}", cb[p * M + m, k, T.ramp(0, 1, g)]) * T.Broadcast(inv[0], g)))

    return rounding


def _lanes_max(terms):
    while len(terms) > 1:
        terms = [T.max(terms[i], terms[i + 1]) if i + 1 < len(terms) else terms[i] for i in range(0, len(terms), 2)]
    return terms[0]
