"""Batched fp32 matmul for CPUs: C[b, i, j] = Σ_k A[b, i, k] · B[b, k, j] — attention's QKᵀ and PV in the Relax
prefill (`aten.bmm` after torch.export's decomposition of scaled_dot_product_attention).

TVM's default CPU pipeline leaves a legalised matmul unscheduled and dlight has no CPU matmul rule: on SmolLM2 a
512-token prefill spent 13.8 of its 15.4 s in these two matmuls, single-threaded and scalar. This kernel is a
register-blocked schedule written directly: tasks of R rows × one batch entry run on TVM's thread pool; per task,
V-lane accumulators for R rows walk k, broadcasting A[b, i, k] and loading B[b, k, j:j+V] (B's rows are
contiguous in j), then store; columns past the last full V-block are a scalar tail. M (rows), K and N may each be
symbolic (the prompt and past lengths) or fixed; rows past M in the last block are clamped to M-1, so that block
recomputes and rewrites the last row with the same value instead of branching.
"""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T


def batch_matmul(batch: int, k_dim: int | None = None, n_dim: int | None = None, rows: int = 4, vector: int = 16,
                 name: str = "batch_matmul"):
    """`name(a[batch, M, K], b[batch, K, N], c[batch, M, N])`, fp32; `k_dim`/`n_dim` fixed or None (symbolic)."""
    R, V = rows, vector
    # a fixed dimension is a constant in the loops; a symbolic one a variable the buffers bind at the call
    m = tirx.Var("m", "int64")
    kd = tirx.Var("k", "int64") if k_dim is None else T.int64(k_dim)
    nd = tirx.Var("n", "int64") if n_dim is None else T.int64(n_dim)

    @T.prim_func
    def kernel(a_h: T.handle, b_h: T.handle, c_h: T.handle):
        T.func_attr({"global_symbol": name, "tirx.noalias": True})
        a = T.match_buffer(a_h, (T.int64(batch), m, kd), "float32")
        b = T.match_buffer(b_h, (T.int64(batch), kd, nd), "float32")
        c = T.match_buffer(c_h, (T.int64(batch), m, nd), "float32")
        row_blocks = (m + T.int64(R - 1)) // T.int64(R)
        for task in T.parallel(T.int64(batch) * row_blocks):
            bt = task // row_blocks
            i0 = task % row_blocks * T.int64(R)
            acc = T.alloc_buffer((R, V), "float32", scope="global")
            for jb in range(nd // T.int64(V)):
                for r in T.unroll(R):
                    for v in T.vectorized(V):
                        acc[r, v] = T.float32(0)
                for k in range(kd):
                    for r in T.unroll(R):
                        for v in T.vectorized(V):
                            acc[r, v] = acc[r, v] + a[bt, T.min(i0 + T.int64(r), m - T.int64(1)), k] * \
                                b[bt, k, jb * T.int64(V) + T.int64(v)]
                for r in T.unroll(R):
                    for v in T.vectorized(V):
                        c[bt, T.min(i0 + T.int64(r), m - T.int64(1)), jb * T.int64(V) + T.int64(v)] = acc[r, v]
            for j in range(nd // T.int64(V) * T.int64(V), nd):
                for r in T.unroll(R):
                    acc[r, 0] = T.float32(0)
                for k in range(kd):
                    for r in T.unroll(R):
                        acc[r, 0] = acc[r, 0] + a[bt, T.min(i0 + T.int64(r), m - T.int64(1)), k] * b[bt, k, j]
                for r in T.unroll(R):
                    c[bt, T.min(i0 + T.int64(r), m - T.int64(1)), j] = acc[r, 0]

    return kernel
