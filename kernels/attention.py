"""Causal attention for CPUs in one kernel: out = softmax(q·kᵀ·scale + mask) · v, for the Relax route's prefill and
decode (`aten.scaled_dot_product_attention`, kept whole instead of decomposed).

torch.export's decomposition of scaled_dot_product_attention leaves, per layer, two batch matmuls and a dozen
legalised elementwise ops over the [heads, S, T] scores (the bool mask turned into -inf, the scale, the softmax, a
fully-masked-row check, the repeated K/V of grouped-query attention, K transposed). On a 512-token SmolLM2 prefill
those took ≈ 420 of 1750 ms, mostly single-threaded and scalar (the softmax alone 184 ms); in a decode step they
are ≈ 10 PrimFunc calls per layer. This kernel does it in two parallel loops and never writes the scores:

1. K transposed once per call into a scratch [G, D, T'] (T' = T rounded up to the vector width, zero-padded), so
   that the scores of R query rows × V keys are R·D fused multiply-adds of V lanes (q[r, d] broadcast, kᵀ[d, j:j+V]
   loaded), as in kernels/batch_matmul.py.
2. Tasks of R query rows that share one K/V head (grouped-query attention reads the un-repeated cache: the rows of
   a task are (query head, position) pairs of that head's group) walk the keys V at a time with an online softmax
   (running max, rescaled sum and accumulator: flash attention's recurrence), p·v accumulated into R × D lanes.

Which keys a query attends to: those the bool `mask` allows (True = attend, broadcast over heads when its head
dimension is 1) **and** at most its own position — key j < T − S + i + 1 for query i, the causal bound. A
decoder-only LM's mask never allows a later key, so this is the mask's meaning exactly, and the bound lets each
task stop at its last row's position (half the work of a prefill). Rows with no key allowed get 0 (torch's
decomposition gives 0 there too). `exp` is a polynomial (Cephes' expf: relative error ≈ 1e-7) that vectorizes,
where `llvm.exp` on a vector becomes one libm call per lane.
"""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from .fast_math import NEG_BIG, fast_exp
from .gemv_direct import tree_sum


def causal_attention(num_heads: int, kv_heads: int, head_dim: int, scale: float, mask_heads: int = 1,
                     rows: int = 4, vector: int = 16, name: str = "causal_attention"):
    """`name(q[1, H, S, D], k[1, G, T, D], v[1, G, T, D], mask[1, MH, S, T] bool, out[1, H, S, D])`, fp32, S and T
    symbolic (T ≥ S: the cache holds the queries' own keys); H = G · n_rep (query head h reads K/V head h // n_rep);
    MH = 1 or H."""
    H, G, D, R, V = num_heads, kv_heads, head_dim, rows, vector
    if H % G:
        raise ValueError(f"{H} query heads do not share {G} K/V heads evenly")
    if mask_heads not in (1, H):
        raise ValueError(f"mask with {mask_heads} heads for {H} query heads")
    n_rep = H // G
    s_len = tirx.Var("s", "int64")
    t_len = tirx.Var("t", "int64")

    def row(task_rows, r0, r):
        """(query head, query position) of row r of a task whose rows start at r0 (the last clamped)."""
        rho = T.min(r0 + T.int64(r), task_rows - T.int64(1))
        return rho // s_len, rho % s_len

    t_pad = (t_len + T.int64(V - 1)) // T.int64(V) * T.int64(V)  # T rounded up to whole vectors

    def mask_head(rep):
        return T.int64(0) if mask_heads == 1 else rep

    @T.prim_func
    def kernel(q_h: T.handle, k_h: T.handle, v_h: T.handle, m_h: T.handle, o_h: T.handle):
        T.func_attr({"global_symbol": name, "tirx.noalias": True})
        q = T.match_buffer(q_h, (T.int64(1), T.int64(H), s_len, T.int64(D)), "float32")
        k = T.match_buffer(k_h, (T.int64(1), T.int64(G), t_len, T.int64(D)), "float32")
        v = T.match_buffer(v_h, (T.int64(1), T.int64(G), t_len, T.int64(D)), "float32")
        mask = T.match_buffer(m_h, (T.int64(1), T.int64(mask_heads), s_len, t_len), "bool")
        out = T.match_buffer(o_h, (T.int64(1), T.int64(H), s_len, T.int64(D)), "float32")
        kt = T.alloc_buffer((T.int64(G), T.int64(D), t_pad), "float32")
        for gd in T.parallel(T.int64(G * D)):
            for j in range(t_pad):
                kt[gd // T.int64(D), gd % T.int64(D), j] = T.if_then_else(
                    j < t_len, k[0, gd // T.int64(D), T.min(j, t_len - T.int64(1)), gd % T.int64(D)], T.float32(0))
        task_rows = T.int64(n_rep) * s_len  # the (query head in the group, position) rows of one K/V head
        blocks = (task_rows + T.int64(R - 1)) // T.int64(R)
        for task in T.parallel(T.int64(G) * blocks):
            g = task // blocks
            r0 = task % blocks * T.int64(R)
            acc = T.alloc_buffer((R, D), "float32", scope="global")
            sc = T.alloc_buffer((R, V), "float32", scope="global")
            ok = T.alloc_buffer((R, V), "float32", scope="global")
            run_max = T.alloc_buffer((R,), "float32", scope="global")
            run_sum = T.alloc_buffer((R,), "float32", scope="global")
            for r in T.unroll(R):
                run_max[r] = T.float32(NEG_BIG)
                run_sum[r] = T.float32(0)
                for d in T.vectorized(D):
                    acc[r, d] = T.float32(0)
            # the causal bound of the task's last row (its rows are in position order within a query head)
            last_pos = T.max(row(task_rows, r0, R - 1)[1], T.if_then_else(
                row(task_rows, r0, 0)[0] == row(task_rows, r0, R - 1)[0], T.int64(0), s_len - T.int64(1)))
            key_end = t_len - s_len + last_pos + T.int64(1)
            for jb in range((key_end + T.int64(V - 1)) // T.int64(V)):
                j0 = jb * T.int64(V)
                for r in T.unroll(R):
                    for x in T.vectorized(V):
                        sc[r, x] = T.float32(0)
                for d in range(D):
                    for r in T.unroll(R):
                        for x in T.vectorized(V):
                            sc[r, x] = sc[r, x] + q[0, g * T.int64(n_rep) + row(task_rows, r0, r)[0],
                                                    row(task_rows, r0, r)[1], d] * kt[g, d, j0 + T.int64(x)]
                for r in T.unroll(R):
                    for x in range(V):
                        ok[r, x] = T.Select(
                            T.And(j0 + T.int64(x) < t_len - s_len + row(task_rows, r0, r)[1] + T.int64(1),
                                  mask[0, mask_head(g * T.int64(n_rep) + row(task_rows, r0, r)[0]),
                                       row(task_rows, r0, r)[1], T.min(j0 + T.int64(x), t_len - T.int64(1))]),
                            T.float32(1), T.float32(0))
                for r in T.unroll(R):
                    block_max = T.alloc_buffer((1,), "float32", scope="local")
                    block_max[0] = run_max[r]
                    for x in range(V):
                        block_max[0] = T.max(block_max[0], T.Select(ok[r, x] > T.float32(0),
                                                                    sc[r, x] * T.float32(scale), T.float32(NEG_BIG)))
                    corr = T.alloc_buffer((1,), "float32", scope="local")
                    corr[0] = fast_exp(run_max[r] - block_max[0])
                    for x in T.vectorized(V):
                        sc[r, x] = fast_exp(sc[r, x] * T.float32(scale) - block_max[0]) * ok[r, x]
                    run_sum[r] = run_sum[r] * corr[0] + tree_sum([sc[r, x] for x in range(V)])
                    run_max[r] = block_max[0]
                    for d in T.vectorized(D):
                        acc[r, d] = acc[r, d] * corr[0]
                for x in range(V):
                    for r in T.unroll(R):
                        for d in T.vectorized(D):
                            acc[r, d] = acc[r, d] + sc[r, x] * v[0, g, T.min(j0 + T.int64(x), t_len - T.int64(1)), d]
            for r in T.unroll(R):
                for d in T.vectorized(D):
                    out[0, g * T.int64(n_rep) + row(task_rows, r0, r)[0], row(task_rows, r0, r)[1], d] = T.Select(
                        run_sum[r] > T.float32(0), acc[r, d] / T.max(run_sum[r], T.float32(1e-30)), T.float32(0))

    return kernel
