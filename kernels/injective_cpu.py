"""A dlight schedule rule for the legalised injective ops on CPU (elementwise, broadcast, concatenate, transpose,
slices): the innermost loop vectorized, the outer loops fused and run on the thread pool when there is enough work.

Where it sits: `targets/relax.py` `compile_relax_model` applies dlight's CPU rules after `LegalizeOps`; dlight has
GEMV and Reduction rules for CPU but nothing for injective ops, which TVM's default CPU pipeline then compiles as
plain serial loops. In the 512-token SmolLM2 prefill those loops took ≈ 85 of 805 ms: RMSNorm's broadcast multiply
29 ms, the KV concatenation 19 ms, rotary's negate 8 ms, adds 7 ms
(`profile-smollm2-135m-2x8g8-fast-s0-x86-983b28ce6115-prefill-512.md`; after this rule:
`profile-smollm2-135m-2x8g8-fast-s0-x86-1edc085719c7-prefill-512.md`).

What it matches: a PrimFunc not marked scheduled whose blocks, after inlining what dlight's `try_inline` can, are one
block with spatial iterators only, under serial, unannotated loops, that does not read the buffer it writes.
What it emits: the innermost loop split by the vector width (the largest power of two ≤ `lanes` dividing a static
extent, at least 4) and vectorized; the outer loops fused and parallel when their extent is symbolic (the prefill's
token count; also the decode step's KV concatenation, whose past length is symbolic: a pool launch for ≈ 12k
elements, measured no slower) or when the block has at least `min_parallel` elements. Below that (a decode step's
[1, 576] ops) a thread-pool launch costs more than the loop. `min_parallel` and `lanes` are set for AVX-512 (16
fp32 lanes); on arm64 (NEON) the same split makes four 4-lane operations, unmeasured.
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base import try_inline
from tvm.s_tir.dlight.cpu.base import CPUScheduleRule

VECTOR_LANES = 16  # fp32 lanes of an AVX-512 register
# elements below which the outer loops stay serial: a decode step's [1, 1, 576] and [1, 1, 1536] ops (no measured
# threshold: any pool launch costs microseconds, these loops well under one)
MIN_PARALLEL = 16384


def _static(extent) -> int | None:
    return extent.value if isinstance(extent, tirx.IntImm) else None


class InjectiveCPU(CPUScheduleRule):
    def __init__(self, min_parallel: int = MIN_PARALLEL, lanes: int = VECTOR_LANES):
        self.min_parallel, self.lanes = min_parallel, lanes

    def apply(self, func, target, _tunable):
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        if func.attrs is not None and "tirx.is_scheduled" in func.attrs and func.attrs["tirx.is_scheduled"]:
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if infos is None:
            return None
        infos = try_inline(sch, infos)
        if len(infos) != 1 or not infos[0].is_injective():
            return None
        block = infos[0].block_rv
        stmt = sch.get(block)
        if any(r.source.same_as(w.source) for r in stmt.reads for w in stmt.writes):
            return None  # reads what it writes: running its iterations in any order could change the result
        loops = sch.get_loops(block)
        if not loops or any(sch.get(lp).kind != tirx.ForKind.SERIAL or sch.get(lp).annotations for lp in loops):
            return None
        extents = [_static(sch.get(lp).extent) for lp in loops]
        inner = extents[-1]
        if inner is not None:
            lanes = self.lanes
            while lanes >= 4 and inner % lanes:
                lanes //= 2
            if lanes >= 4:
                _, lane = sch.split(loops[-1], [None, lanes])
                sch.vectorize(lane)
        outer = extents[:-1]
        if outer:
            size = 1
            for e in extents:
                size *= e or 1
            outer_static = 1
            for e in outer:
                outer_static *= e or 1
            if None in outer or (outer_static > 1 and size >= self.min_parallel):
                sch.parallel(sch.fuse(*loops[:-1]) if len(outer) > 1 else loops[0])
        return sch
