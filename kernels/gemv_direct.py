"""Direct-decode AQLM GEMV for CPUs (decode, batch 1–8): y[n, o] = scale[o] · Σ_j Σ_t (Σ_m C_m[code[o,j,m], t]) · x[n, j·g+t] (+ bias).

Schedule: output rows are split into blocks of R rows handed to the thread pool (`T.parallel`); inside a block,
U input groups × R rows of g-wide accumulators are kept live (independent FMA chains: one chain per row is
latency-bound, docs/tvm-and-ort-notes.md N7), each group's weights are decoded once into registers (the sum of the
M codewords, fp16→fp32) and reused for every token of the batch. Codes are read as their storage type and masked
to B bits, so signed int8/int16 storage (and 16-bit patterns in int16) decode correctly (docs/tvm-and-ort-notes.md
N8).
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
    # Row partitions of a fused layer (q/k/v, gate/up: passes.fuse_shared_input): rows of partition p decode with
    # codebooks p·M .. p·M+M-1 of a [P·M, K, g] codebook tensor. None = one partition.
    partitions: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.partitions is not None and sum(self.partitions) != self.out_features:
            raise ValueError(f"partitions {self.partitions} do not add up to out_features {self.out_features}")

    @property
    def code_dtype(self) -> str:
        return self.config.code_dtype_name

    @property
    def parts(self) -> tuple[int, ...]:
        return self.partitions or (self.out_features,)

    @property
    def row_quantum(self) -> int:
        """The largest power of two dividing every partition: row blocks must not straddle two partitions."""
        q = 1
        while all(p % (q * 2) == 0 for p in self.parts) and q < 1024:
            q *= 2
        return q

    def codebook_rows(self) -> int:
        return len(self.parts) * self.config.num_codebooks

    def partition_of(self, o):
        """Partition index of output row `o` (a TIR expression; 0 when there is one partition)."""
        from tvm.script import tirx as T

        expr, start = T.int32(0), 0
        for size in self.parts[:-1]:
            start += size
            expr = expr + T.Cast("int32", o >= start)
        return expr


def tree_reduce(terms, op):
    """op folded over terms as a balanced tree: neighbours paired level by level, so the CPU sees independent
    operations instead of one dependent chain (an odd term out goes up a level unchanged)."""
    while len(terms) > 1:
        terms = [op(terms[i], terms[i + 1]) if i + 1 < len(terms) else terms[i] for i in range(0, len(terms), 2)]
    return terms[0]


def tree_sum(terms):
    """Σ terms as a balanced tree of adds."""
    return tree_reduce(terms, lambda a, b: a + b)


def tree_max(terms):
    """max(terms) as a balanced tree of `T.max`."""
    return tree_reduce(terms, T.max)


def _largest_divisor(n: int, preferred: int) -> int:
    d = preferred
    while n % d:
        d //= 2
    return d


L1_BYTES = 32 * 1024


def default_schedule(shape: GemvShape) -> dict:
    """Schedule parameters measured best on Zen 4 (benchmarks/results/kernels-x86.md).

    Accumulators: N·R·U·g ≤ 128 fp32 (16 ymm registers; beyond that they spill and batch 4 ran 4× slower than
    batch 1). Codebooks that fit in L1 (Kx8): 8 rows × 1 group, no prefetch (2x8g8 batch 1: 4096² 0.54 → 0.49 ms,
    11008×4096 1.53 → 1.37 ms against 4 rows × 4 groups; batch 2 and 1x8g8 a little faster too). Codebooks that do
    not (1x16: 1 MiB, competing for L2 with the streamed codes): 8 rows and a software prefetch of the codes 64
    groups ahead, which took 11008×4096 from 3.3 to 2.0 ms."""
    cfg = shape.config
    big = cfg.num_codebooks * cfg.codebook_size * cfg.in_group_size * 2 > L1_BYTES
    budget = max(1, 128 // (shape.batch * cfg.in_group_size))  # R·U
    rows = min(8, budget)
    groups = max(1, budget // rows) if big else 1
    return {"rows": rows, "groups": groups, "prefetch": 64 if big else 0}


def gemv_direct(shape: GemvShape, rows: int | None = None, groups: int | None = None, prefetch: int | None = None,
                name: str = "aqlm_gemv"):
    """A TIR PrimFunc `name(x[N, I], codes[O, I/g, M], codebooks[M, K, g], scales[O], bias[O], y[N, O])`.

    rows/groups/prefetch default to `default_schedule(shape)`; `prefetch` = how many input groups ahead to
    prefetch each row's codes (0: off). (Widening the codebooks to fp32 once per call, to take
    vcvtph2ps out of the loop, measured slower for 2x8g8: an fp32 table plus a 4096-float x overflow the 32 KiB L1.)"""
    sched = default_schedule(shape)
    rows = sched["rows"] if rows is None else rows
    groups = sched["groups"] if groups is None else groups
    prefetch = sched["prefetch"] if prefetch is None else prefetch
    cfg = shape.config
    O, I, N, g, M = shape.out_features, shape.in_features, shape.batch, cfg.in_group_size, cfg.num_codebooks
    cfg.check_shape(O, I)
    J, K, mask = I // g, cfg.codebook_size, cfg.codebook_size - 1
    R, U = _largest_divisor(min(O, shape.row_quantum), rows), _largest_divisor(J, groups)
    PM = shape.codebook_rows()
    act, cbt, cdt = shape.act_dtype, shape.codebook_dtype, shape.code_dtype

    def decode(cb, codes, o, j, m, t):
        return T.Cast("float32", cb[shape.partition_of(o) * M + m, T.bitwise_and(T.Cast("int32", codes[o, j, m]), mask), t])

    @T.prim_func
    def kernel(x: T.Buffer((N, I), act), codes: T.Buffer((O, J, M), cdt), cb: T.Buffer((PM, K, g), cbt),
               scales: T.Buffer((O,), "float32"), bias: T.Buffer((O,), "float32"), y: T.Buffer((N, O), act)):
        T.func_attr({"global_symbol": name, "tirx.noalias": True})
        for ob in T.parallel(O // R):
            acc = T.alloc_buffer((N, R, U, g), "float32", scope="global")
            w = T.alloc_buffer((R, U, g), "float32", scope="global")
            for n, r, u, t in T.grid(N, R, U, g):
                acc[n, r, u, t] = T.float32(0)
            for jo in range(J // U):
                if prefetch > 0:
                    for r in T.unroll(R):
                        # locality 3: keep it; the codes are read once, but an NTA hint measured slower here
                        T.evaluate(T.call_llvm_intrin("void", "llvm.prefetch.p0", T.address_of(
                            codes[ob * R + r, T.min(jo * U + prefetch, J - 1), 0]), T.int32(0), T.int32(3), T.int32(1)))
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
                    # Reduce as a tree (vector adds over u, then a pairwise sum of g lanes): a serial sum of
                    # the U·g partial sums is a dependent chain of 32 adds per row, ~12% of a 4096-wide row.
                    v = T.alloc_buffer((g,), "float32", scope="global")
                    for t in T.vectorized(g):
                        v[t] = tree_sum([acc[n, r, u, t] for u in range(U)])
                    y[n, ob * R + r] = T.Cast(act, tree_sum([v[t] for t in range(g)]) * scales[ob * R + r]
                                              + bias[ob * R + r])

    return kernel
