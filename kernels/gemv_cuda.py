"""Direct-decode AQLM GEMV for NVIDIA GPUs (decode, batch 1–8), same signature as the CPU kernels.

Schedule: a thread block of W warps owns W·RW output rows; each warp walks its RW rows one after another, its
32 lanes striding over the input groups (lane l takes groups l, l+32, …, so one warp's code loads are coalesced).
Codebooks that fit in shared memory (Kx8: 2x256x8 fp16 = 8 KiB) are staged there once per block; larger ones
(1x16: 1 MiB) are read through L1/L2 with one 16-byte load per codeword. Each lane decodes a group's g weights
(sum of the M codewords, fp16→fp32) into registers and reuses them for every token; partial sums are reduced
across the warp with shuffles and lane 0 writes the row (scale and bias applied in fp32).
"""

from __future__ import annotations

from tvm.script import tirx as T

from .gemv_direct import GemvShape, _largest_divisor

SHARED_CODEBOOK_BYTES = 32 * 1024


def gemv_cuda(shape: GemvShape, warps: int = 4, rows_per_warp: int = 4, name: str = "aqlm_gemv_cuda"):
    cfg = shape.config
    O, I, N, g, M = shape.out_features, shape.in_features, shape.batch, cfg.in_group_size, cfg.num_codebooks
    cfg.check_shape(O, I)
    J, K, mask = I // g, cfg.codebook_size, cfg.codebook_size - 1
    act, cbt, cdt = shape.act_dtype, shape.codebook_dtype, shape.code_dtype
    if shape.partitions is not None and len(shape.partitions) > 1:
        raise NotImplementedError("gemv_cuda: fused (partitioned) layers are not supported yet")
    RW = _largest_divisor(O, rows_per_warp)
    W = _largest_divisor(O // RW, warps)
    RB = W * RW  # rows per block
    CB = M * K * g
    shared = CB * 2 <= SHARED_CODEBOOK_BYTES
    JO = (J + 31) // 32

    CBS = CB if shared else 1  # a 1-element placeholder when the codebooks stay in global memory
    LOADS = (CB + W * 32 - 1) // (W * 32) if shared else 0  # cooperative loads per thread to stage the codebooks

    def codeword(cbs, cb, m, code, t):
        """Element t of codeword `code` of codebook m: from shared memory when staged there, else global."""
        return T.Cast("float32", cbs[m * K * g + code * g + t] if shared else cb[m, code, t])

    @T.prim_func
    def kernel(x: T.Buffer((N, I), act), codes: T.Buffer((O, J, M), cdt), cb: T.Buffer((M, K, g), cbt),
               scales: T.Buffer((O,), "float32"), bias: T.Buffer((O,), "float32"), y: T.Buffer((N, O), act)):
        T.func_attr({"global_symbol": name, "tirx.noalias": True})
        for bx in T.thread_binding(O // RB, thread="blockIdx.x"):
            for ty in T.thread_binding(W, thread="threadIdx.y"):
                for tx in T.thread_binding(32, thread="threadIdx.x"):
                    cbs = T.alloc_shared((CBS,), cbt)
                    acc = T.alloc_local((N,), "float32")
                    w = T.alloc_local((g,), "float32")
                    red = T.alloc_local((1,), "float32")
                    for i in range(LOADS):
                        if i * W * 32 + ty * 32 + tx < CB:
                            cbs[i * W * 32 + ty * 32 + tx] = cb[(i * W * 32 + ty * 32 + tx) // (K * g),
                                                                (i * W * 32 + ty * 32 + tx) // g % K,
                                                                (i * W * 32 + ty * 32 + tx) % g]
                    T.tvm_storage_sync("shared")
                    for rw in range(RW):
                        for n in range(N):
                            acc[n] = T.float32(0)
                        for jo in range(JO):
                            if jo * 32 + tx < J:
                                for t in range(g):
                                    w[t] = T.float32(0)
                                for m in range(M):
                                    for t in range(g):
                                        w[t] = w[t] + codeword(cbs, cb, m, T.bitwise_and(T.Cast(
                                            "int32", codes[bx * RB + ty * RW + rw, jo * 32 + tx, m]), mask), t)
                                for n in range(N):
                                    for t in range(g):
                                        acc[n] = acc[n] + w[t] * T.Cast("float32", x[n, (jo * 32 + tx) * g + t])
                        for n in range(N):
                            red[0] = acc[n]
                            for s in T.unroll(5):
                                red[0] = red[0] + T.tvm_warp_shuffle_down(
                                    T.tvm_warp_activemask(), red[0], 16 >> s, 32, 32)
                            if tx == 0:
                                y[n, bx * RB + ty * RW + rw] = T.Cast(
                                    act, red[0] * scales[bx * RB + ty * RW + rw] + bias[bx * RB + ty * RW + rw])
    return kernel
