"""Dense fp32 linear for CPUs (the layers AQLM leaves dense, e.g. the lm_head): y[n, o] = Σ_i x[n, i] · W[o, i].

TVM's default CPU pipeline leaves a legalised matmul unscheduled (270 ms for SmolLM2's 576→49152 lm_head), and
dlight's CPU GEMV rule does not match it; this kernel is the direct schedule: R rows of V-lane accumulators per
thread-pool task, x re-read from L1, W streamed once. Any token count (symbolic N). W may be fp16 (an AQLM
checkpoint's lm_head): widened in registers, accumulated in fp32, half the bytes streamed. Or int8 rows with an fp32
scale per row (`row_scales`: the artifact's int8 head, export.keep_head_int8): a quarter of fp32's bytes.
"""

from __future__ import annotations

from tvm.script import tirx as T

from .gemv_direct import _largest_divisor, tree_sum


def dense_linear(out_features: int, in_features: int, rows: int = 4, name: str = "dense_linear",
                 index_dtype: str = "int64", weight_dtype: str = "float32", row_scales: bool = False):
    """`name(x[n, I], w[O, I], y[n, O])`, or with `row_scales` `name(x, w, s[O], y)` with y = (x · wᵀ) · s."""
    O, I = out_features, in_features
    V = _largest_divisor(I, 16)
    R = _largest_divisor(O, rows)

    @T.macro
    def rows_dot(x, w, acc, n, ob):
        """acc[r, :] = lane partial sums of x[n] · w[ob·R + r] for the R rows of block `ob`."""
        for r in T.unroll(R):
            for v in T.vectorized(V):
                acc[r, v] = T.float32(0)
        for io in range(I // V):
            for r in T.unroll(R):
                for v in T.vectorized(V):
                    acc[r, v] = acc[r, v] + x[n, io * V + v] * T.Cast("float32", w[ob * R + r, io * V + v])

    @T.prim_func
    def plain(x_h: T.handle, w: T.Buffer((O, I), weight_dtype), y_h: T.handle):
        T.func_attr({"global_symbol": name, "tirx.noalias": True})
        n_tok = T.int64() if index_dtype == "int64" else T.int32()
        x = T.match_buffer(x_h, (n_tok, I), "float32")
        y = T.match_buffer(y_h, (n_tok, O), "float32")
        for ob in T.parallel(O // R):
            for n in range(n_tok):
                acc = T.alloc_buffer((R, V), "float32", scope="global")
                rows_dot(x, w, acc, n, ob)
                for r in T.unroll(R):
                    y[n, ob * R + r] = tree_sum([acc[r, v] for v in range(V)])

    @T.prim_func
    def scaled(x_h: T.handle, w: T.Buffer((O, I), weight_dtype), s: T.Buffer((O,), "float32"), y_h: T.handle):
        T.func_attr({"global_symbol": name, "tirx.noalias": True})
        n_tok = T.int64() if index_dtype == "int64" else T.int32()
        x = T.match_buffer(x_h, (n_tok, I), "float32")
        y = T.match_buffer(y_h, (n_tok, O), "float32")
        for ob in T.parallel(O // R):
            for n in range(n_tok):
                acc = T.alloc_buffer((R, V), "float32", scope="global")
                rows_dot(x, w, acc, n, ob)
                for r in T.unroll(R):
                    y[n, ob * R + r] = tree_sum([acc[r, v] for v in range(V)]) * s[ob * R + r]

    return scaled if row_scales else plain
