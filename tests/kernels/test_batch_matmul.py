"""kernels/batch_matmul.py (the Relax route's `aten.bmm` converter: batch matmuls other than attention, which
kernels/attention.py takes whole) against numpy, fixed and symbolic sizes."""

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
