"""The decoder layer's small fused ops for CPUs, each one kernel where torch.export traces several: RMSNorm and the
rotary embedding, for the Relax route's prefill and decode (targets/relax.py recognises their traced patterns and
calls these instead; the traced ops are then dead code).

Why: each traced op is its own PrimFunc call in the Relax VM with its own output tensor, and the VM's own work per
call — an allocation, a kill, reshapes — is what a small model's decode step is made of. One RMSNorm traces to six
ops (x², the mean, + ε, rsqrt, two multiplies: SmolLM2's 61 norms ≈ 370 calls of a step's ≈ 1200), one rotary
embedding to seven per tensor (two slices, a negation, a concatenation, two multiplies, an add). A `perf` of the
decode loop put ≈ 17% of the calling thread in the VM's own code (docs/tvm-and-ort-notes.md N29).

- `rms_norm(C, eps)`: y = w · (x · 1/√(mean(x²) + ε)) per row, as HF's LlamaRMSNorm computes it in fp32 (and Qwen2's,
  Mistral's); rows symbolic (prefill: split over the thread pool) or fixed (the decode step's one row, on the calling
  thread: a pool launch costs more than 576 values). The sum of squares runs in `vector` lanes, then a balanced tree.
- `rotary(H, D)`: HF's half-split rotary embedding of a [1, H, S, D] tensor.
"""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from .gemv_direct import tree_sum

PARALLEL_FROM_ROWS = 4  # rows: below this a fixed row count stays on the calling thread


def rms_norm(channels: int, eps: float, rows: int | None = None, vector: int = 16, name: str = "rms_norm"):
    """`name(x[n, C], w[C], y[n, C])` fp32: y[r] = w · (x[r] / √(mean(x[r]²) + eps)); `rows` fixed or None
    (symbolic). C must be a multiple of `vector`."""
    C, V = channels, vector
    if C % V:
        raise ValueError(f"rms_norm: {C} channels, expected a multiple of {V}")
    K = C // V
    n = tirx.Var("n", "int64") if rows is None else T.int64(rows)

    @T.macro
    def body(x, w, y, r):
        acc = T.alloc_buffer((V,), "float32", scope="local")
        inv = T.alloc_buffer((1,), "float32", scope="local")
        for v in T.vectorized(V):
            acc[v] = T.float32(0)
        for k in range(K):
            for v in T.vectorized(V):
                acc[v] = acc[v] + x[r, k * V + v] * x[r, k * V + v]
        inv[0] = T.float32(1) / T.sqrt(tree_sum([acc[i] for i in range(V)]) / T.float32(C) + T.float32(eps))
        for k in range(K):
            for v in T.vectorized(V):
                y[r, k * V + v] = w[k * V + v] * (x[r, k * V + v] * inv[0])

    @T.prim_func
    def threaded(x_h: T.handle, w: T.Buffer((C,), "float32"), y_h: T.handle):
        T.func_attr({"global_symbol": name, "tirx.noalias": True})
        x = T.match_buffer(x_h, (n, C), "float32")
        y = T.match_buffer(y_h, (n, C), "float32")
        for r in T.parallel(n):
            body(x, w, y, r)

    @T.prim_func
    def serial(x_h: T.handle, w: T.Buffer((C,), "float32"), y_h: T.handle):
        T.func_attr({"global_symbol": name, "tirx.noalias": True})
        x = T.match_buffer(x_h, (n, C), "float32")
        y = T.match_buffer(y_h, (n, C), "float32")
        for r in range(n):
            body(x, w, y, r)

    return threaded if rows is None or rows >= PARALLEL_FROM_ROWS else serial


def rotary(heads: int, head_dim: int, vector: int = 16, name: str = "rotary"):
    """`name(t[1, H, S, D], cos[1, 1, S, D], sin[1, 1, S, D], y[1, H, S, D])` fp32, S symbolic: HF's half-split rotary
    embedding, y = t · cos + rotate_half(t) · sin with rotate_half(t) = [−t[D/2:], t[:D/2]] — traced, two slices, a
    negation, a concatenation, two multiplies and an add per tensor, each a VM call (targets/relax.py). Heads × positions
    are split over the thread pool from 64 rows up (a prefill), else run on the calling thread."""
    H, D = heads, head_dim
    if D % 2:
        raise ValueError(f"rotary: head_dim {D}, expected an even one")
    half = D // 2
    s_len = tirx.Var("s", "int64")

    @T.macro
    def row(t, cos, sin, y, h, s):
        for d in T.vectorized(half):
            y[0, h, s, d] = t[0, h, s, d] * cos[0, 0, s, d] - t[0, h, s, d + half] * sin[0, 0, s, d]
        for d in T.vectorized(half):
            y[0, h, s, d + half] = t[0, h, s, d + half] * cos[0, 0, s, d + half] + t[0, h, s, d] * sin[0, 0, s, d + half]

    @T.prim_func
    def kernel(t_h: T.handle, c_h: T.handle, s_h: T.handle, y_h: T.handle):
        T.func_attr({"global_symbol": name, "tirx.noalias": True})
        t = T.match_buffer(t_h, (T.int64(1), T.int64(H), s_len, T.int64(D)), "float32")
        cos = T.match_buffer(c_h, (T.int64(1), T.int64(1), s_len, T.int64(D)), "float32")
        sin = T.match_buffer(s_h, (T.int64(1), T.int64(1), s_len, T.int64(D)), "float32")
        y = T.match_buffer(y_h, (T.int64(1), T.int64(H), s_len, T.int64(D)), "float32")
        if s_len * T.int64(H) >= T.int64(64):
            for hs in T.parallel(T.int64(H) * s_len):
                row(t, cos, sin, y, hs // s_len, hs % s_len)
        else:
            for hs in range(T.int64(H) * s_len):
                row(t, cos, sin, y, hs // s_len, hs % s_len)

    return kernel
