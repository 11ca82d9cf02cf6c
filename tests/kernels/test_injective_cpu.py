"""kernels/injective_cpu.py (dlight rule for legalised injective ops on CPU): before/after on legalised Relax ops —
a symbolic-size broadcast multiply and the KV concatenation get a parallel outer loop and a vectorized inner one and
still compute the same; a decode-sized op and a one-row op stay serial; a reduction and an already scheduled
function are left alone."""

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from tvm import relax, tirx  # noqa: E402
from tvm.s_tir import dlight as dl  # noqa: E402

from aqlm_compile.kernels.injective_cpu import InjectiveCPU  # noqa: E402
from aqlm_compile.targets.x86 import x86_target  # noqa: E402


def _legalised(shape_x, shape_y, op):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape_x, "float32"))
    y = relax.Var("y", relax.TensorType(shape_y, "float32"))
    with bb.function("main", [x, y]):
        with bb.dataflow():
            out = bb.emit_output(op(x, y))
        bb.emit_func_output(out)
    return relax.transform.LegalizeOps()(bb.get())


def _loop_kinds(func):
    import tvm_ffi

    kinds = []
    tvm_ffi.structural_walk(func.body, [(tirx.For, lambda n: kinds.append(n.kind))], order="post")
    return kinds


def _schedule(mod, target):
    with target:
        return dl.ApplyDefaultSchedule(dl.cpu.GEMV(), dl.cpu.Reduction(), InjectiveCPU())(mod)


def _prim(mod, name=""):
    return [f for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc) and name in gv.name_hint][0]


def test_symbolic_broadcast_multiply_runs_parallel_and_vectorized():
    n = tirx.Var("n", "int64")
    target = x86_target()
    mod = _legalised([1, n, 64], [1, n, 1], relax.op.multiply)
    assert tirx.ForKind.PARALLEL not in _loop_kinds(_prim(mod))  # before: plain serial loops
    after = _schedule(mod, target)
    kinds = _loop_kinds(_prim(after))
    assert tirx.ForKind.PARALLEL in kinds and tirx.ForKind.VECTORIZED in kinds
    ex = tvm.compile(after, target=target)
    vm = relax.VirtualMachine(ex, tvm.cpu())
    rng = np.random.default_rng(0)
    for tokens in (1, 37):
        a = rng.standard_normal((1, tokens, 64)).astype(np.float32)
        b = rng.standard_normal((1, tokens, 1)).astype(np.float32)
        np.testing.assert_allclose(vm["main"](tvm.runtime.tensor(a), tvm.runtime.tensor(b)).numpy(), a * b,
                                   rtol=1e-6)


def test_small_static_op_stays_serial():
    after = _schedule(_legalised([1, 1, 576], [1, 1, 576], relax.op.add), x86_target())
    kinds = _loop_kinds(_prim(after))
    assert tirx.ForKind.VECTORIZED in kinds and tirx.ForKind.PARALLEL not in kinds


def test_symbolic_inner_extent_with_one_outer_iteration_stays_serial():
    """A mask-like [1, P+S] op: nothing to share among threads, and its symbolic inner loop is not vectorized."""
    n = tirx.Var("n", "int64")
    kinds = _loop_kinds(_prim(_schedule(_legalised([1, n], [1, n], relax.op.add), x86_target())))
    assert tirx.ForKind.PARALLEL not in kinds and tirx.ForKind.VECTORIZED not in kinds


def test_kv_concatenation_with_symbolic_lengths_and_a_narrow_inner_extent():
    """The prefill's KV concatenation ([1, H, P, D] ++ [1, H, S, D], P and S symbolic; D = 40: 8 lanes) runs
    parallel and vectorized and computes the same."""
    p, s = tirx.Var("p", "int64"), tirx.Var("s", "int64")
    target = x86_target()
    after = _schedule(_legalised([1, 3, p, 40], [1, 3, s, 40], lambda a, b: relax.op.concat([a, b], axis=2)), target)
    kinds = _loop_kinds(_prim(after))
    assert tirx.ForKind.PARALLEL in kinds and tirx.ForKind.VECTORIZED in kinds
    vm = relax.VirtualMachine(tvm.compile(after, target=target), tvm.cpu())
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((1, 3, 5, 40)).astype(np.float32), rng.standard_normal((1, 3, 7, 40)).astype(np.float32)
    np.testing.assert_array_equal(vm["main"](tvm.runtime.tensor(a), tvm.runtime.tensor(b)).numpy(),
                                  np.concatenate([a, b], axis=2))


def test_reductions_are_not_matched():
    mod = _legalised([4, 64], [4, 64], lambda x, y: relax.op.sum(relax.op.multiply(x, y), axis=[1]))
    assert InjectiveCPU().apply(_prim(mod, "sum"), x86_target(), False) is None
    assert InjectiveCPU().apply(_prim(mod, "multiply"), x86_target(), False) is not None
    scheduled = _prim(mod, "multiply").with_attr("tirx.is_scheduled", True)
    assert InjectiveCPU().apply(scheduled, x86_target(), False) is None  # a hand-scheduled kernel is left alone
