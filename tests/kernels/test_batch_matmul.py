"""kernels/batch_matmul.py (attention's QKᵀ and PV in the Relax prefill) against numpy, fixed and symbolic sizes,
and its use in the whole-model prefill (the Relax route's `aten.bmm` converter)."""

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from aqlm_compile.kernels.batch_matmul import batch_matmul  # noqa: E402
from aqlm_compile.targets.x86 import build, x86_target  # noqa: E402


@pytest.mark.parametrize("k_fixed,n_fixed", [(True, False), (False, True), (False, False), (True, True)])
def test_batch_matmul_matches_numpy(k_fixed, n_fixed):
    """Rows not a multiple of the row block (clamped tail), columns not a multiple of the vector (scalar tail),
    and one row (decode); one compiled kernel serves every symbolic size."""
    batch, k, n = 3, 24, 37
    lib = build(batch_matmul(batch, k if k_fixed else None, n if n_fixed else None, name="k"), x86_target())
    rng = np.random.default_rng(0)
    for m in (1, 5, 8, 13):
        a = rng.standard_normal((batch, m, k)).astype(np.float32)
        b = rng.standard_normal((batch, k, n)).astype(np.float32)
        c = tvm.runtime.empty((batch, m, n), "float32", tvm.cpu())
        lib["k"](tvm.runtime.tensor(a), tvm.runtime.tensor(b), c)
        ref = np.einsum("bik,bkj->bij", a.astype(np.float64), b.astype(np.float64))
        assert np.abs(c.numpy() - ref).max() <= 1e-5 * np.abs(ref).max(), m


def test_prefill_attention_runs_on_the_batch_matmul_kernel(tiny_llama_ckpt, tmp_path):
    """The Relax prefill's QKᵀ and PV are the scheduled kernel (not a legalised matmul), with the torch logits."""
    from tiny_models import torch_prefill_logits

    from aqlm_compile.targets.plan import relax_graphs
    from aqlm_compile.targets.relax import compile_relax_model, relax_decoder_module

    module = relax_decoder_module(relax_graphs(tiny_llama_ckpt), device="cpu")
    names = [gv.name_hint for gv, _ in module[0].functions_items()]
    assert any(n.startswith("prefill_bmm_") for n in names) and not any(n.startswith("matmul") for n in names)
    compile_relax_model(module, tmp_path, x86_target(), "model.so")
    vm = tvm.relax.VirtualMachine(tvm.runtime.load_module(str(tmp_path / "model.so")), tvm.cpu())
    spec, params = module[2], module[1]
    ids = np.array([[1, 5, 9, 13, 17, 21, 25, 29, 33]], np.int64)
    empty = tvm.runtime.tensor(np.zeros((1, spec.num_kv_heads, 0, spec.head_dim), np.float32))
    got = vm["prefill"](tvm.runtime.tensor(ids), tvm.runtime.tensor(np.ones_like(ids)),
                        *[empty] * (2 * spec.num_layers), *params)[0].numpy()[0]
    want = torch_prefill_logits(tiny_llama_ckpt, ids)
    assert np.abs(got - want).max() <= 1e-3 * max(1.0, np.abs(want).max())
