"""Elementwise CPU kernels that TVM's default CPU pipeline would leave unscheduled and scalar: the gated MLP's
`silu(gate) · up` (`aten.silu` kept whole in the Relax route, fused with the multiply that follows it). On a
512-token SmolLM2 prefill the legalised sigmoid and the two multiplies took ≈ 85 ms: one thread, `llvm.exp` per
lane, and the [tokens, 1536] tensor written and read twice more.

`silu_mul(n)`: y = a / (1 + exp(−a)) · b over flat float32 tensors, exp from kernels/fast_math.py. A symbolic
length (the prefill) is split into thread-pool tasks of whole vectors; a fixed small one (the decode step's 1536
values) runs on the calling thread — a pool launch costs more than the work.
"""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from .fast_math import fast_exp

PARALLEL_FROM = 16384  # values: below this a fixed-length call stays on one thread


def silu(x):
    """x · sigmoid(x) as a float32 expression (finite for every finite x: fast_exp clamps)."""
    return x / (T.float32(1.0) + fast_exp(T.float32(0.0) - x))


def silu_mul(length: int | None = None, vector: int = 16, task_vectors: int = 256, name: str = "silu_mul"):
    """`name(a[n], b[n], y[n])` fp32, y = silu(a) · b; `length` fixed or None (symbolic)."""
    V, B = vector, task_vectors
    n = tirx.Var("n", "int64") if length is None else T.int64(length)
    full = n // T.int64(V)

    @T.prim_func
    def threaded(a_h: T.handle, b_h: T.handle, y_h: T.handle):
        T.func_attr({"global_symbol": name, "tirx.noalias": True})
        a = T.match_buffer(a_h, (n,), "float32")
        b = T.match_buffer(b_h, (n,), "float32")
        y = T.match_buffer(y_h, (n,), "float32")
        for task in T.parallel((full + T.int64(B - 1)) // T.int64(B)):
            for i in range(B):
                if task * T.int64(B) + T.int64(i) < full:
                    for v in T.vectorized(V):
                        y[(task * T.int64(B) + T.int64(i)) * T.int64(V) + T.int64(v)] = silu(
                            a[(task * T.int64(B) + T.int64(i)) * T.int64(V) + T.int64(v)]) * \
                            b[(task * T.int64(B) + T.int64(i)) * T.int64(V) + T.int64(v)]
        for e in range(full * T.int64(V), n):
            y[e] = silu(a[e]) * b[e]

    @T.prim_func
    def serial(a_h: T.handle, b_h: T.handle, y_h: T.handle):
        T.func_attr({"global_symbol": name, "tirx.noalias": True})
        a = T.match_buffer(a_h, (n,), "float32")
        b = T.match_buffer(b_h, (n,), "float32")
        y = T.match_buffer(y_h, (n,), "float32")
        for i in range(full):
            for v in T.vectorized(V):
                y[i * T.int64(V) + T.int64(v)] = silu(a[i * T.int64(V) + T.int64(v)]) * b[i * T.int64(V) + T.int64(v)]
        for e in range(full * T.int64(V), n):
            y[e] = silu(a[e]) * b[e]

    return threaded if length is None or length >= PARALLEL_FROM else serial


def silu_mul_halves(half: int, rows: int | None = None, vector: int = 16, name: str = "silu_mul_halves"):
    """`name(g[r, 2·half], u[r, 2·half], y[r, half])` fp32, y[t, h] = silu(g[t, h]) · u[t, half + h]: the gated MLP
    on the fused gate/up output (the x86 default, passes/fuse_shared_input.py) without copying its halves out
    first. The caller passes the fused tensor as both `g` and `u`: a call_tir callee with one input and one output
    is asked for a reshape pattern that a hand-written kernel cannot answer (docs N22). `rows` fixed or None
    (symbolic: the prefill, one thread-pool task per row); a fixed small call runs on the calling thread."""
    H, V = half, vector
    r = tirx.Var("r", "int64") if rows is None else T.int64(rows)
    full = H // V

    @T.macro
    def row(g, u, y, t):
        for i in range(full):
            for v in T.vectorized(V):
                y[t, i * V + v] = silu(g[t, i * V + v]) * u[t, H + i * V + v]
        for e in range(full * V, H):
            y[t, e] = silu(g[t, e]) * u[t, H + e]

    rows_loop = T.parallel if rows is None or rows * H >= PARALLEL_FROM else T.serial

    @T.prim_func
    def func(g_h: T.handle, u_h: T.handle, y_h: T.handle):
        T.func_attr({"global_symbol": name, "tirx.noalias": True})
        g = T.match_buffer(g_h, (r, 2 * H), "float32")
        u = T.match_buffer(u_h, (r, 2 * H), "float32")
        y = T.match_buffer(y_h, (r, H), "float32")
        for t in rows_loop(r):
            row(g, u, y, t)

    return func
