"""Dense fp32 linear for CPUs (the layers AQLM leaves dense, e.g. the lm_head): y[n, o] = Σ_i x[n, i] · W[o, i].

TVM's default CPU pipeline leaves a legalised matmul unscheduled (270 ms for SmolLM2's 576→49152 lm_head), and
dlight's CPU GEMV rule does not match it; this kernel is the direct schedule: R rows of V-lane accumulators per
thread-pool task, x re-read from L1, W streamed once. Any token count (symbolic N). W may be fp16 (an AQLM
checkpoint's lm_head): widened in registers, accumulated in fp32, half the bytes streamed. Or int8 rows with an fp32
scale per row (`row_scales`: the artifact's int8 head, export.keep_head_int8): a quarter of fp32's bytes.

The weights are software-prefetched `prefetch_bytes` ahead into L2 (`prefetcht1`, one per 64-byte line of each
row, for the first token of a call only): the head is read once per token, mostly from DRAM, and the hardware
prefetcher alone left the kernel latency-bound. Hand-measured on the 2-vCPU Zen 4 VM, 2 threads, SmolLM2's
49152×576 head, interleaved rounds over rotating copies of the weights larger than the 32 MiB L3 (a /tmp script;
figures in docs/tvm-and-ort-notes.md N24): int8 1.91 → 0.70 ms, fp16 2.61 → 1.21 ms, fp32 3.75 → 2.95 ms; a
prefetch into L1 (`prefetcht0`) gained less (int8 1.99 → 1.59 ms), and 24 or 96 KiB ahead less than 48. The whole
model's gain is in the scoreboard run `prefetch-injective` (benchmarks/results).
"""

from __future__ import annotations

from tvm.script import tirx as T

from .gemv_direct import _largest_divisor, tree_sum


def dense_linear(out_features: int, in_features: int, rows: int = 4, name: str = "dense_linear",
                 index_dtype: str = "int64", weight_dtype: str = "float32", row_scales: bool = False,
                 prefetch_bytes: int = 48 * 1024, prefetch_locality: int = 2):
    """`name(x[n, I], w[O, I], y[n, O])`, or with `row_scales` `name(x, w, s[O], y)` with y = (x · wᵀ) · s."""
    O, I = out_features, in_features
    V = _largest_divisor(I, 16)
    R = _largest_divisor(O, rows)

    wbytes = {"float32": 4, "float16": 2}.get(weight_dtype, 1)
    prefetch = -(-prefetch_bytes // (R * I * wbytes))  # row blocks ahead
    # io steps of V weights per 64-byte line: the prefetch is issued once per line of each row (per fewer steps
    # where I/V is not a multiple: an extra prefetch of a line costs little)
    step = _largest_divisor(I // V, max(1, 64 // (V * wbytes)))

    @T.macro
    def rows_dot(x, w, acc, n, ob):
        """acc[r, :] = lane partial sums of x[n] · w[ob·R + r] for the R rows of block `ob`."""
        for r in T.unroll(R):
            for v in T.vectorized(V):
                acc[r, v] = T.float32(0)
        for line in range(I // V // step):
            if prefetch > 0 and n == 0:  # later tokens of a prefill re-read the rows from cache
                for r in T.unroll(R):
                    # locality 2 (prefetcht1, into L2): t0 (into L1) gained much less, the L1 miss queue being
                    # the limit (module docstring)
                    T.evaluate(T.call_llvm_intrin("void", "llvm.prefetch.p0", T.address_of(
                        w[T.min(ob * R + r + prefetch * R, O - 1), line * step * V]), T.int32(0), T.int32(prefetch_locality),
                        T.int32(1)))
            for ii in T.unroll(step):
                for r in T.unroll(R):
                    for v in T.vectorized(V):
                        acc[r, v] = acc[r, v] + x[n, (line * step + ii) * V + v] * \
                            T.Cast("float32", w[ob * R + r, (line * step + ii) * V + v])

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
