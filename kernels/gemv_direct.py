"""Direct-decode AQLM GEMV for CPUs (decode, batch 1–8): y[n, o] = scale[o] · Σ_j Σ_t (Σ_m C_m[code[o,j,m], t]) · x[n, j·g+t] (+ bias).

Schedule: output rows are split into blocks of R rows handed to the thread pool (`T.parallel`); inside a block,
U input groups × R rows of g-wide accumulators are kept live (independent FMA chains, gotcha G9 of the facts
doc: one chain per row is latency-bound), each group's weights are decoded once into registers (the sum of the
M codewords, fp16→fp32) and reused for every token of the batch. Codes are read as their storage type and masked
to B bits, so signed int8/int16 storage (and 16-bit patterns in int16) decode correctly (G10).
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm.script import tirx as T

from aqlm_compile.config import AqlmConfig


@dataclass(frozen=True)
class GemvShape:
    out_features: int
    in_features: int
    config: AqlmConfig
    batch: int
    act_dtype: str = "float32"  # x and y
    codebook_dtype: str = "float16"
    bias: bool = False

    @property
    def code_dtype(self) -> str:
        return self.config.code_dtype_name


def _largest_divisor(n: int, preferred: int) -> int:
    d = preferred
    while n % d:
        d //= 2
    return d


def gemv_direct(shape: GemvShape, rows: int = 4, groups: int = 4, name: str = "aqlm_gemv"):
    """A TIR PrimFunc `name(x[N, I], codes[O, I/g, M], codebooks[M, K, g], scales[O], (bias[O],) y[N, O])`."""
    cfg = shape.config
    O, I, N, g, M = shape.out_features, shape.in_features, shape.batch, cfg.in_group_size, cfg.num_codebooks
    cfg.check_shape(O, I)
    J, K, mask = I // g, cfg.codebook_size, cfg.codebook_size - 1
    R, U = _largest_divisor(O, rows), _largest_divisor(J, groups)
    act, cbt, cdt = shape.act_dtype, shape.codebook_dtype, shape.code_dtype

    def decode(cb, codes, o, j, m, t):
        return T.Cast("float32", cb[m, T.bitwise_and(T.Cast("int32", codes[o, j, m]), mask), t])

    @T.prim_func
    def kernel(x: T.Buffer((N, I), act), codes: T.Buffer((O, J, M), cdt), cb: T.Buffer((M, K, g), cbt),
               scales: T.Buffer((O,), "float32"), bias: T.Buffer((O,), "float32"), y: T.Buffer((N, O), act)):
        T.func_attr({"global_symbol": name, "tirx.noalias": True})
        for ob in T.parallel(O // R):
            acc = T.alloc_buffer((N, R, U, g), "float32", scope="global")
            w = T.alloc_buffer((R, U, g), "float32", scope="global")
            for n, r, u, t in T.grid(N, R, U, g):
                acc[n, r, u, t] = T.float32(0)
            for jo in range(J // U):
                for r in T.unroll(R):
                    for u in T.unroll(U):
                        for t in T.vectorized(g):
                            w[r, u, t] = decode(cb, codes, ob * R + r, jo * U + u, 0, t)
                        for m in range(1, M):
                            for t in T.vectorized(g):
                                w[r, u, t] = w[r, u, t] + decode(cb, codes, ob * R + r, jo * U + u, m, t)
                for n in range(N):
                    for r in T.unroll(R):
                        for u in T.unroll(U):
                            for t in T.vectorized(g):
                                acc[n, r, u, t] = acc[n, r, u, t] + w[r, u, t] * T.Cast("float32", x[n, (jo * U + u) * g + t])
            for n in range(N):
                for r in T.unroll(R):
                    s = T.alloc_buffer((1,), "float32", scope="global")
                    s[0] = T.float32(0)
                    for u in range(U):
                        for t in range(g):
                            s[0] = s[0] + acc[n, r, u, t]
                    y[n, ob * R + r] = T.Cast(act, s[0] * scales[ob * R + r] + bias[ob * R + r])

    return kernel
