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

K and V are read from a cache of any capacity C ≥ T (`[1, G, C, D]`): the keys that count are the first T, where T
is the mask's last dimension. A graph that concatenates its cache passes C = T; the Relax route's in-place cache
(passes/kv_cache_in_place.py) passes buffers preallocated once, into which `kv_append` wrote this call's keys.

`decode_attention` is the one-query case (a decode step): no transposed K, the n_rep query heads of a K/V head read
each key row once (vectorised over D, then a horizontal sum), on the calling thread up to PARALLEL_KEYS keys.
"""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from .fast_math import NEG_BIG, fast_exp
from .gemv_direct import tree_max, tree_sum


# a decode step's attention runs on the thread pool (one task per K/V head) from this many keys. 256 was measured on
# hot caches (stop 36); in the whole model the K/V cache comes from DRAM (the weights streamed each token evict it),
# and 64 made a SmolLM2 step after 128 cached tokens ≈ 4% faster (docs/tvm-and-ort-notes.md N39)
PARALLEL_KEYS = 64


def prompt_schedule(features) -> dict:
    """`causal_attention`'s schedule arguments for a CPU with these features (kernels.registry's names). AVX2 without
    AVX-512 (16 vector registers): p·v in 16-dim chunks — 4 rows × 16 dims were 8 registers, all 64 dims (32
    registers) spilled: 0.92× the time of a 512-token SmolLM2 prompt's attention on a Zen 3 VM
    (attention-ab-avx2-dim-chunk-16.md) — and 6 query rows per task, so the scores' 6 × 2 accumulators, a K row's 2
    vectors and a broadcast query use 15 of the 16 registers (attention-ab-avx2-rows-6.md; docs N42). Else {} (the
    AVX-512 schedule: 4 rows, whose 16 whole-row accumulators fit its 32 registers; not re-measured)."""
    return dict(rows=6, dim_chunk=16) if "avx2" in features and "avx512f" not in features else {}


def _online_softmax_block(rows: int, vector: int, dim: int, dim_chunk: int | None = None):
    """Two macros for `rows` running softmaxes (flash attention's recurrence): `start` empties them; `block_update`
    folds one block of `vector` keys (from j0) into them: sc[r, x] the scaled score of row r and key j0 + x, NEG_BIG where that key is not allowed (it then
    weighs exactly 0); the block's max rescales the running sum and acc[r, :], then p·v of the block's value rows is
    added."""
    R, V, D = rows, vector, dim
    # dims per p·v chunk; 0: all D per key (the schedule for 32 vector registers)
    DC = next(c for c in (dim_chunk, 16, 8, 4, 2, 1) if D % c == 0) if dim_chunk else 0

    @T.macro
    def start(acc, run_max, run_sum):
        for r in T.unroll(R):
            run_max[r] = T.float32(NEG_BIG)
            run_sum[r] = T.float32(0)
            for d in T.vectorized(D):
                acc[r, d] = T.float32(0)

    @T.macro
    def block_update(sc, acc, run_max, run_sum, v, g, j0, t_len):
        for r in T.unroll(R):
            block = T.alloc_buffer((2,), "float32", scope="local")  # the block's max, the running sums' correction
            block[0] = T.max(run_max[r], tree_max([sc[r, x] for x in range(V)]))
            block[1] = fast_exp(run_max[r] - block[0])
            for x in T.vectorized(V):
                sc[r, x] = T.Select(sc[r, x] > T.float32(NEG_BIG), fast_exp(sc[r, x] - block[0]), T.float32(0))
            run_sum[r] = run_sum[r] * block[1] + tree_sum([sc[r, x] for x in range(V)])
            run_max[r] = block[0]
            for d in T.vectorized(D):
                acc[r, d] = acc[r, d] * block[1]
        if DC == 0:
            for x in range(V):
                for r in T.unroll(R):
                    for d in T.vectorized(D):
                        acc[r, d] = acc[r, d] + sc[r, x] * v[0, g, T.min(j0 + T.int64(x), t_len - T.int64(1)), d]
        else:
            # p·v in chunks of DC dims: R × DC accumulators stay in registers over the block's V keys (all D at
            # once, 4 × 64 floats, is 32 AVX2 registers: they went through memory on every multiply-add)
            for dc in range(D // DC):
                for x in T.unroll(V):
                    for r in T.unroll(R):
                        for d in T.vectorized(DC):
                            acc[r, dc * DC + d] = acc[r, dc * DC + d] + sc[r, x] * v[
                                0, g, T.min(j0 + T.int64(x), t_len - T.int64(1)), dc * DC + d]

    return start, block_update


def decode_attention(num_heads: int, kv_heads: int, head_dim: int, scale: float, mask_heads: int = 1,
                     vector: int = 16, name: str = "decode_attention", keys: str = "mask"):
    """`name(q[1, H, 1, D], k[1, G, C, D], v[1, G, C, D], mask[1, MH, 1, T] bool, out[1, H, 1, D])`, fp32, T ≤ C
    symbolic: `causal_attention` for one query (its causal bound is then every key, so only the mask decides).

    For `causal_attention`'s two parallel loops (K transposed into a scratch, then the scores) one query has too
    little work: at SmolLM2's shapes (9 heads, 3 K/V heads, 64 dims) it took 10–16 µs at 1–65 keys, 30 calls a
    step. Here each K/V head's n_rep query rows take the dot product with each key row as it is read (D/V vector
    multiply-adds and one horizontal sum per row and key), blocks of V keys go through the same online softmax, and
    the heads run on the calling thread below PARALLEL_KEYS keys (a thread-pool launch costs ≈ 1.2 µs at 2 threads
    and 3 heads split unevenly over 2 threads): 0.6 / 2.2 / 3.9 µs at 1 / 33 / 65 keys, 13.8 µs at 257 (hand-run on
    the 2-vCPU Xeon VM, stop 36).

    `keys="count"` (the ONNX Runtime op's form, `aqlm.GroupQueryAttention`): no mask; the signature is
    `name(q, k, v, out, t)` with t the number of cached keys that count (every one of them is allowed)."""
    H, G, D, V = num_heads, kv_heads, head_dim, vector
    _check_keys(keys)
    if H % G:
        raise ValueError(f"{H} query heads do not share {G} K/V heads evenly")
    if mask_heads not in (1, H):
        raise ValueError(f"mask with {mask_heads} heads for {H} query heads")
    if D % V:
        raise ValueError(f"head dim {D}: expected a multiple of {V}")
    n_rep, DV = H // G, D // V
    t_len, c_len = tirx.Var("t", "int64"), tirx.Var("c", "int64")

    def mask_head(h):
        return T.int64(0) if mask_heads == 1 else h

    def key(j, t_len):  # a key index clamped into the cache (the last block's lanes past T are masked out)
        return T.min(j, t_len - T.int64(1))

    def mask_allows(mask, h, j):
        return T.bool(True) if mask is None else mask[0, mask_head(h), 0, j]

    start, block_update = _online_softmax_block(n_rep, V, D)

    @T.macro
    def one_head(q, k, v, mask, out, g, t_len):
        acc = T.alloc_buffer((n_rep, D), "float32", scope="global")
        sc = T.alloc_buffer((n_rep, V), "float32", scope="global")
        prod = T.alloc_buffer((n_rep, V), "float32", scope="global")
        run_max = T.alloc_buffer((n_rep,), "float32", scope="global")
        run_sum = T.alloc_buffer((n_rep,), "float32", scope="global")
        start(acc, run_max, run_sum)
        for jb in range((t_len + T.int64(V - 1)) // T.int64(V)):
            for x in range(V):
                for r in T.unroll(n_rep):
                    for lane in T.vectorized(V):
                        prod[r, lane] = tree_sum([q[0, g * n_rep + r, 0, dv * V + lane] *
                                                  k[0, g, key(jb * V + x, t_len), dv * V + lane] for dv in range(DV)])
                    allowed = T.And(jb * V + x < t_len, mask_allows(mask, g * n_rep + r, key(jb * V + x, t_len)))
                    sc[r, x] = T.Select(allowed, tree_sum([prod[r, lane] for lane in range(V)]) * T.float32(scale),
                                        T.float32(NEG_BIG))
            block_update(sc, acc, run_max, run_sum, v, g, jb * T.int64(V), t_len)
        for r in T.unroll(n_rep):
            for d in T.vectorized(D):
                out[0, g * n_rep + r, 0, d] = T.Select(run_sum[r] > T.float32(0),
                                                       acc[r, d] / T.max(run_sum[r], T.float32(1e-30)), T.float32(0))

    @T.macro
    def heads(q, k, v, mask, out, t_len):
        if t_len < T.int64(PARALLEL_KEYS):
            for g in range(T.int64(G)):
                one_head(q, k, v, mask, out, g, t_len)
        else:
            for g in T.parallel(T.int64(G)):
                one_head(q, k, v, mask, out, g, t_len)

    @T.prim_func
    def kernel(q_h: T.handle, k_h: T.handle, v_h: T.handle, m_h: T.handle, o_h: T.handle):
        # aqlm.kv_capacity: K/V may be a larger cache (passes/kv_cache_in_place.py checks for it)
        T.func_attr({"global_symbol": name, "tirx.noalias": True, "aqlm.kv_capacity": True})
        q = T.match_buffer(q_h, (T.int64(1), T.int64(H), T.int64(1), T.int64(D)), "float32")
        k = T.match_buffer(k_h, (T.int64(1), T.int64(G), c_len, T.int64(D)), "float32")
        v = T.match_buffer(v_h, (T.int64(1), T.int64(G), c_len, T.int64(D)), "float32")
        mask = T.match_buffer(m_h, (T.int64(1), T.int64(mask_heads), T.int64(1), t_len), "bool")
        out = T.match_buffer(o_h, (T.int64(1), T.int64(H), T.int64(1), T.int64(D)), "float32")
        assert t_len <= c_len, "attention: the mask counts more keys than the K/V cache holds"
        heads(q, k, v, mask, out, t_len)

    @T.prim_func
    def counted(q_h: T.handle, k_h: T.handle, v_h: T.handle, o_h: T.handle, t: T.int64):
        T.func_attr({"global_symbol": name, "tirx.noalias": True, "aqlm.kv_capacity": True})
        q = T.match_buffer(q_h, (T.int64(1), T.int64(H), T.int64(1), T.int64(D)), "float32")
        k = T.match_buffer(k_h, (T.int64(1), T.int64(G), c_len, T.int64(D)), "float32")
        v = T.match_buffer(v_h, (T.int64(1), T.int64(G), c_len, T.int64(D)), "float32")
        out = T.match_buffer(o_h, (T.int64(1), T.int64(H), T.int64(1), T.int64(D)), "float32")
        assert t >= T.int64(1) and t <= c_len, "attention: the key count is not within the K/V cache"
        heads(q, k, v, None, out, t)

    return kernel if keys == "mask" else counted


def _check_keys(keys: str) -> None:
    if keys not in ("mask", "count"):
        raise ValueError(f"keys={keys!r}: expected 'mask' or 'count'")


def causal_attention(num_heads: int, kv_heads: int, head_dim: int, scale: float, mask_heads: int = 1,
                     rows: int = 4, vector: int = 16, name: str = "causal_attention", keys: str = "mask",
                     layout: str = "bhsd", dim_chunk: int | None = None):
    """`name(q[1, H, S, D], k[1, G, C, D], v[1, G, C, D], mask[1, MH, S, T] bool, out[1, H, S, D])`, fp32, S, T
    and C symbolic (S ≤ T ≤ C: the cache holds the queries' own keys; the first T count); H = G · n_rep (query head h reads K/V head h // n_rep);
    MH = 1 or H.

    The ONNX Runtime op's form (`aqlm.GroupQueryAttention`, targets/ort_op): `keys="count"` takes no mask, the
    signature is `name(q, k, v, out, t)` with t the number of cached keys (only the causal bound applies);
    `layout="bshd"` reads q and writes out token-major, as that op's [1, S, H·D] tensors are laid out: the buffers
    keep their [1, H, S, D] indexing with strides (S·H·D, D, H·D, 1), so a caller passes those strides."""
    H, G, D, R, V = num_heads, kv_heads, head_dim, rows, vector
    if H % G:
        raise ValueError(f"{H} query heads do not share {G} K/V heads evenly")
    if mask_heads not in (1, H):
        raise ValueError(f"mask with {mask_heads} heads for {H} query heads")
    _check_keys(keys)
    if layout not in ("bhsd", "bshd"):
        raise ValueError(f"layout={layout!r}: expected 'bhsd' or 'bshd'")
    n_rep = H // G
    s_len = tirx.Var("s", "int64")
    t_len, c_len = tirx.Var("t", "int64"), tirx.Var("c", "int64")
    # q and out: [1, H, S, D] as indexed; token-major in memory for "bshd"
    qo_strides = (s_len * T.int64(H * D), T.int64(D), T.int64(H * D), T.int64(1)) if layout == "bshd" else None

    def row(task_rows, r0, r):
        """(query head, query position) of row r of a task whose rows start at r0 (the last clamped)."""
        rho = T.min(r0 + T.int64(r), task_rows - T.int64(1))
        return rho // s_len, rho % s_len

    def padded(t):  # T rounded up to whole vectors
        return (t + T.int64(V - 1)) // T.int64(V) * T.int64(V)

    def mask_head(rep):
        return T.int64(0) if mask_heads == 1 else rep

    def mask_allows(mask, h, s, j):
        return T.bool(True) if mask is None else mask[0, mask_head(h), s, j]

    start, block_update = _online_softmax_block(R, V, D, dim_chunk)

    @T.macro
    def body(q, k, v, mask, out, t_len):
        kt = T.alloc_buffer((T.int64(G), T.int64(D), padded(t_len)), "float32")
        for gd in T.parallel(T.int64(G * D)):
            for j in range(padded(t_len)):
                kt[gd // T.int64(D), gd % T.int64(D), j] = T.if_then_else(
                    j < t_len, k[0, gd // T.int64(D), T.min(j, t_len - T.int64(1)), gd % T.int64(D)], T.float32(0))
        task_rows = T.int64(n_rep) * s_len  # the (query head in the group, position) rows of one K/V head
        blocks = (task_rows + T.int64(R - 1)) // T.int64(R)
        for task in T.parallel(T.int64(G) * blocks):
            g = task // blocks
            r0 = task % blocks * T.int64(R)
            acc = T.alloc_buffer((R, D), "float32", scope="global")
            sc = T.alloc_buffer((R, V), "float32", scope="global")
            run_max = T.alloc_buffer((R,), "float32", scope="global")
            run_sum = T.alloc_buffer((R,), "float32", scope="global")
            start(acc, run_max, run_sum)
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
                if j0 + T.int64(V) <= t_len:
                    # every key of the block is in the cache: the mask's bytes are one vector load, the causal bound
                    # one compare of 32-bit lanes (clamped key indices read the mask a byte at a time)
                    for r in T.unroll(R):
                        for x in T.vectorized(V):
                            sc[r, x] = T.Select(
                                T.And(T.Cast("int32", t_len - s_len + row(task_rows, r0, r)[1] + T.int64(1) - j0) > x,
                                      mask_allows(mask, g * T.int64(n_rep) + row(task_rows, r0, r)[0],
                                                  row(task_rows, r0, r)[1], j0 + T.Cast("int64", x))),
                                sc[r, x] * T.float32(scale), T.float32(NEG_BIG))
                else:
                    for r in T.unroll(R):
                        for x in range(V):
                            sc[r, x] = T.Select(
                                T.And(j0 + T.int64(x) < t_len - s_len + row(task_rows, r0, r)[1] + T.int64(1),
                                      mask_allows(mask, g * T.int64(n_rep) + row(task_rows, r0, r)[0],
                                                  row(task_rows, r0, r)[1], T.min(j0 + T.int64(x), t_len - T.int64(1)))),
                                sc[r, x] * T.float32(scale), T.float32(NEG_BIG))
                block_update(sc, acc, run_max, run_sum, v, g, j0, t_len)
            for r in T.unroll(R):
                for d in T.vectorized(D):
                    out[0, g * T.int64(n_rep) + row(task_rows, r0, r)[0], row(task_rows, r0, r)[1], d] = T.Select(
                        run_sum[r] > T.float32(0), acc[r, d] / T.max(run_sum[r], T.float32(1e-30)), T.float32(0))

    @T.prim_func
    def kernel(q_h: T.handle, k_h: T.handle, v_h: T.handle, m_h: T.handle, o_h: T.handle):
        # aqlm.kv_capacity: K/V may be a larger cache (passes/kv_cache_in_place.py checks for it)
        T.func_attr({"global_symbol": name, "tirx.noalias": True, "aqlm.kv_capacity": True})
        q = T.match_buffer(q_h, (T.int64(1), T.int64(H), s_len, T.int64(D)), "float32", strides=qo_strides)
        k = T.match_buffer(k_h, (T.int64(1), T.int64(G), c_len, T.int64(D)), "float32")
        v = T.match_buffer(v_h, (T.int64(1), T.int64(G), c_len, T.int64(D)), "float32")
        mask = T.match_buffer(m_h, (T.int64(1), T.int64(mask_heads), s_len, t_len), "bool")
        out = T.match_buffer(o_h, (T.int64(1), T.int64(H), s_len, T.int64(D)), "float32", strides=qo_strides)
        assert t_len <= c_len, "attention: the mask counts more keys than the K/V cache holds"
        body(q, k, v, mask, out, t_len)

    @T.prim_func
    def counted(q_h: T.handle, k_h: T.handle, v_h: T.handle, o_h: T.handle, t: T.int64):
        T.func_attr({"global_symbol": name, "tirx.noalias": True, "aqlm.kv_capacity": True})
        q = T.match_buffer(q_h, (T.int64(1), T.int64(H), s_len, T.int64(D)), "float32", strides=qo_strides)
        k = T.match_buffer(k_h, (T.int64(1), T.int64(G), c_len, T.int64(D)), "float32")
        v = T.match_buffer(v_h, (T.int64(1), T.int64(G), c_len, T.int64(D)), "float32")
        out = T.match_buffer(o_h, (T.int64(1), T.int64(H), s_len, T.int64(D)), "float32", strides=qo_strides)
        assert s_len <= t and t <= c_len, "attention: the key count is not within the K/V cache and after the queries"
        body(q, k, v, None, out, t)

    return kernel if keys == "mask" else counted


def rope_kv_append(heads: int, kv_heads: int, head_dim: int, parallel_from: int = 16, name: str = "rope_kv_append"):
    """`name(q[1, S, H·D], k[1, S, G·D], v[1, S, G·D], cos[S, D/2], sin[S, D/2], q_out[1, S, H·D], k_cache[1, G, C, D],
    v_cache[1, G, C, D], p)`, fp32, S and C symbolic: the first half of ONNX Runtime's GroupQueryAttention
    (do_rotary, half-split), for the op library's `aqlm.GroupQueryAttention` (targets/ort_op). Token i is at
    position p + i; cos/sin are the rows of the rotary tables for those positions (the caller passes rows p … p+S-1:
    a whole [max_positions, D/2] table is 1 MB for SmolLM2, and a copy of it per call cost 150 µs). q and k rotated
    (y[d] = x[d]·cos − x[d+D/2]·sin, y[d+D/2] = x[d+D/2]·cos + x[d]·sin, d < D/2; HF's rotate_half with its cos/sin
    duplicated over both halves), q into q_out in its own layout, k into the cache's rows p … p+S-1, v copied there.
    Tokens are split over the thread pool from `parallel_from` of them (a prompt); a decode step runs on the calling
    thread."""
    H, G, D = heads, kv_heads, head_dim
    if D % 2:
        raise ValueError(f"rope_kv_append: head_dim {D}, expected an even one")
    half = D // 2
    s_len, c_len = tirx.Var("s", "int64"), tirx.Var("c", "int64")

    @T.macro
    def token(q, k, v, cos, sin, qo, kc, vc, p, i):
        for h in range(H):
            for d in T.vectorized(half):
                qo[0, i, h * D + d] = q[0, i, h * D + d] * cos[i, d] - q[0, i, h * D + d + half] * sin[i, d]
            for d in T.vectorized(half):
                qo[0, i, h * D + d + half] = (q[0, i, h * D + d + half] * cos[i, d]
                                              + q[0, i, h * D + d] * sin[i, d])
        for g in range(G):
            for d in T.vectorized(half):
                kc[0, g, p + i, d] = k[0, i, g * D + d] * cos[i, d] - k[0, i, g * D + d + half] * sin[i, d]
            for d in T.vectorized(half):
                kc[0, g, p + i, d + half] = (k[0, i, g * D + d + half] * cos[i, d]
                                             + k[0, i, g * D + d] * sin[i, d])
            for d in T.vectorized(D):
                vc[0, g, p + i, d] = v[0, i, g * D + d]

    @T.prim_func
    def kernel(q_h: T.handle, k_h: T.handle, v_h: T.handle, cos_h: T.handle, sin_h: T.handle, qo_h: T.handle,
               kc_h: T.handle, vc_h: T.handle, p: T.int64):
        T.func_attr({"global_symbol": name, "tirx.noalias": True})
        q = T.match_buffer(q_h, (T.int64(1), s_len, T.int64(H * D)), "float32")
        k = T.match_buffer(k_h, (T.int64(1), s_len, T.int64(G * D)), "float32")
        v = T.match_buffer(v_h, (T.int64(1), s_len, T.int64(G * D)), "float32")
        cos = T.match_buffer(cos_h, (s_len, T.int64(half)), "float32")
        sin = T.match_buffer(sin_h, (s_len, T.int64(half)), "float32")
        qo = T.match_buffer(qo_h, (T.int64(1), s_len, T.int64(H * D)), "float32")
        kc = T.match_buffer(kc_h, (T.int64(1), T.int64(G), c_len, T.int64(D)), "float32")
        vc = T.match_buffer(vc_h, (T.int64(1), T.int64(G), c_len, T.int64(D)), "float32")
        assert p >= T.int64(0) and p + s_len <= c_len, "rope_kv_append: the new keys do not fit the cache's capacity"
        if s_len >= T.int64(parallel_from):
            for i in T.parallel(s_len):
                token(q, k, v, cos, sin, qo, kc, vc, p, i)
        else:
            for i in range(s_len):
                token(q, k, v, cos, sin, qo, kc, vc, p, i)

    return kernel


def kv_append(kv_heads: int, head_dim: int, name: str = "kv_append"):
    """`name(cache[1, G, C, D], new[1, G, S, D], p)`, fp32, C and S symbolic, p a scalar: new's S rows written into
    the cache at rows p … p+S-1, in place (Relax `call_tir_inplace`, passes/kv_cache_in_place.py). A call whose rows
    would not fit stops with an error instead of writing past the buffer (the runtime grows the cache first)."""
    G, D = kv_heads, head_dim
    c_len, s_len = tirx.Var("c", "int64"), tirx.Var("s", "int64")

    @T.prim_func
    def kernel(c_h: T.handle, n_h: T.handle, p: T.int64):
        T.func_attr({"global_symbol": name, "tirx.noalias": True})
        cache = T.match_buffer(c_h, (T.int64(1), T.int64(G), c_len, T.int64(D)), "float32")
        new = T.match_buffer(n_h, (T.int64(1), T.int64(G), s_len, T.int64(D)), "float32")
        assert p >= T.int64(0) and p + s_len <= c_len, "kv_append: the new keys do not fit the cache's capacity"
        for g in range(T.int64(G)):
            for i in range(s_len):
                for d in T.vectorized(T.int64(D)):
                    cache[0, g, p + i, d] = new[0, g, i, d]

    return kernel
