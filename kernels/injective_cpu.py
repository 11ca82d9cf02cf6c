"""A dlight schedule rule for the legalised injective ops on CPU (elementwise, broadcast, concatenate, transpose,
slices): the innermost loop vectorized, the rest fused and run on the thread pool when there is enough work.

Where it sits: `targets/relax.py` `compile_relax_model` applies dlight's CPU rules after `LegalizeOps`; dlight has
GEMV and Reduction rules for CPU but nothing for injective ops, which TVM's default CPU pipeline then compiles as
plain serial loops. In the 512-token SmolLM2 prefill those loops took ≈ 85 of 805 ms: RMSNorm's broadcast multiply
29 ms, the KV concatenation 19 ms, rotary's negate 8 ms, adds 7 ms
(`profile-smollm2-135m-2x8g8-fast-s0-x86-983b28ce6115-prefill-512.md`).

What it matches: a PrimFunc not marked scheduled whose blocks, after inlining what dlight's `try_inline` can, are one
block with spatial iterators only. What it emits: the block's loops split into (outer loops fused, innermost loop);
the innermost split by the vector width and vectorized when its extent is a static multiple of it; the fused outer
loop parallel when the block has at least `min_parallel` elements or a symbolic size (the prefill's token count) —
below that a thread-pool launch costs more than the loop (a decode step's [1, 576] ops).
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base import try_inline
from tvm.s_tir.dlight.cpu.base import CPUScheduleRule

VECTOR_LANES = 16  # fp32 lanes of an AVX-512 register (two AVX2 registers)
MIN_PARALLEL = 16384  # elements


class InjectiveCPU(CPUScheduleRule):
    def __init__(self, min_parallel: int = MIN_PARALLEL, lanes: int = VECTOR_LANES):
        self.min_parallel, self.lanes = min_parallel, lanes

    def apply(self, func, target, _tunable):
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if infos is None:
            return None
        infos = try_inline(sch, infos)
        if len(infos) != 1 or not infos[0].is_injective():
            return None
        block = infos[0].block_rv
        loops = sch.get_loops(block)
        if not loops:
            return None
        extents = [sch.get(loop).extent for loop in loops]
        symbolic = any(not isinstance(e, tirx.IntImm) for e in extents)
        size = 1
        for e in extents:
            size *= e.value if isinstance(e, tirx.IntImm) else 1
        inner = loops[-1]
        inner_extent = extents[-1]
        if isinstance(inner_extent, tirx.IntImm) and inner_extent.value % self.lanes == 0:
            _, lane = sch.split(inner, [None, self.lanes])
            sch.vectorize(lane)
        if len(loops) > 1 and (symbolic or size >= self.min_parallel):
            outer = sch.fuse(*loops[:-1]) if len(loops) > 2 else loops[0]
            sch.parallel(outer)
        return sch
