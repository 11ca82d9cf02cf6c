"""passes/kv_cache_in_place.py: before/after on the tiny Llama's Relax functions, and what it leaves alone."""

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from tvm import relax  # noqa: E402

from aqlm_compile.kernels.attention import kv_append  # noqa: E402
from aqlm_compile.passes.kv_cache_in_place import kv_cache_in_place  # noqa: E402


def test_concatenated_cache_becomes_one_written_in_place(tiny_llama_ckpt, tmp_path):
    """Before: each layer concatenates its past K/V and returns the present ones. After: the same functions take
    the past length and capacity-sized caches, write them with kv_append (one call per cache), return the logits
    only — and compute the same logits as the concatenating form."""
    from aqlm_compile.runtime.tvm_runtime import KvCache
    from aqlm_compile.targets.plan import relax_graphs
    from aqlm_compile.targets.relax import compile_relax_model, relax_decoder_module
    from aqlm_compile.targets.x86 import x86_target

    graphs = relax_graphs(tiny_llama_ckpt)
    before = relax_decoder_module(graphs, device="cpu", kv_in_place=False)
    mod, params, spec = before[0], before[1], before[2]
    count = 2 * spec.num_layers
    live = relax.transform.DeadCodeElimination(["prefill", "decode"])(mod)
    assert live["decode"].script().count("R.concat((past_") == count
    after = live
    for name in ("prefill", "decode"):
        after = kv_cache_in_place(after, name, 2, count, kv_append)
        assert after is not None, name
        func, text = after[name], after[name].script()
        assert "R.concat((past_" not in text and text.count(f"{name}_kv_append_") == count
        assert str(func.params[2].ty).startswith("R.Shape") and func.params[2].name == "past_length"
        caches = func.params[3:3 + count]
        assert [p.name for p in caches] == [f"cache_{i}" for i in range(count)]
        assert len({str(p.ty.shape[2]) for p in caches}) == 1  # one capacity symbol
        assert isinstance(func.body.ty, relax.TensorType) and func.attrs["aqlm.kv_cache"] == "in_place"
    relax.analysis.well_formed(after)  # raises on the first violation

    # the same logits, step by step, as the concatenating module
    ids = [np.array([[1, 5, 9, 13, 17, 21, 25]], np.int64), np.array([[29]], np.int64), np.array([[3, 4]], np.int64)]
    results = {}
    for label, module in (("concat", before), ("in_place", relax_decoder_module(graphs, device="cpu"))):
        folder = tmp_path / label
        folder.mkdir()
        entry = compile_relax_model(module, folder, x86_target(), "model.so")
        assert entry["kv_cache"] == label
        vm = relax.VirtualMachine(tvm.runtime.load_module(str(folder / "model.so")), tvm.cpu())
        kv = KvCache(tvm, tvm.cpu(), spec.num_layers, spec.num_kv_heads, spec.head_dim, label)
        outs = []
        for x in ids:
            fn = vm["decode" if x.shape[1] == 1 and kv.length else "prefill"]
            out = fn(tvm.runtime.tensor(x), tvm.runtime.tensor(np.ones((1, kv.length + x.shape[1]), np.int64)),
                     *kv.arguments(x.shape[1]), *module[1])
            outs.append(kv.logits(out).numpy())
        results[label] = outs
    for a, b in zip(results["concat"], results["in_place"]):
        assert np.abs(a - b).max() <= 1e-5 * max(1.0, np.abs(a).max())


def _toy(extra_reader: bool):
    """decode(x, mask, past_k, past_v) with one concatenation per cache, read as K and V (arguments 1 and 2, as
    kernels/attention.py takes them) by a call_tir of a PrimFunc marked aqlm.kv_capacity (or, `extra_reader`, the
    concatenation also read by a sum)."""
    from tvm.script import tirx as T

    @T.prim_func
    def attend(q: T.handle, k: T.handle, v: T.handle, o: T.handle):
        T.func_attr({"global_symbol": "attend", "aqlm.kv_capacity": True})
        c = T.int64()
        Q = T.match_buffer(q, (1, 2, 1, 4), "float32")
        K = T.match_buffer(k, (1, 2, c, 4), "float32")
        V = T.match_buffer(v, (1, 2, c, 4), "float32")
        O = T.match_buffer(o, (1, 2, 1, 4), "float32")
        for g, d in T.grid(2, 4):
            O[0, g, 0, d] = Q[0, g, 0, d] * K[0, g, 0, d] + V[0, g, 0, d]

    p = tvm.tirx.Var("p", "int64")
    bb = relax.BlockBuilder()
    gv = bb.add_func(attend, "attend")
    x = relax.Var("x", relax.TensorType([1, 2, 1, 4], "float32"))
    mask = relax.Var("mask", relax.TensorType([1, p + 1], "int64"))
    pk = relax.Var("past_k", relax.TensorType([1, 2, p, 4], "float32"))
    pv = relax.Var("past_v", relax.TensorType([1, 2, p, 4], "float32"))
    with bb.function("decode", [x, mask, pk, pv]):
        with bb.dataflow():
            k = bb.emit(relax.op.concat([pk, x], axis=2))
            v = bb.emit(relax.op.concat([pv, x], axis=2))
            o = bb.emit(relax.call_tir(gv, [x, k, v], relax.TensorType([1, 2, 1, 4], "float32")))
            if extra_reader:
                o = bb.emit(relax.op.add(o, relax.op.sum(k)))
            out = bb.emit_output(relax.Tuple([o, k, v]))
        bb.emit_func_output(out)
    return bb.get()


def test_a_cache_with_another_reader_is_left_alone():
    """A concatenation also read by something other than a capacity-aware kernel (which would see the cache's
    unwritten rows) → None: the route keeps the concatenating form. The same graph without it is rewritten."""
    assert kv_cache_in_place(_toy(extra_reader=True), "decode", 2, 2, kv_append) is None
    out = kv_cache_in_place(_toy(extra_reader=False), "decode", 2, 2, kv_append)
    assert out is not None and "R.concat" not in out["decode"].script()
    assert [p.name for p in out["decode"].params] == ["x", "mask", "past_length", "cache_0", "cache_1"]
