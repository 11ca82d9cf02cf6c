"""kernels/dense.py (the dense linear: the lm_head, the FP16 baseline's layers) against numpy: fp32, fp16 and
int8-with-row-scales weights, one and several tokens (the prefetch is issued for the first only), with and without
the software prefetch, input widths whose vector steps do not fill whole 64-byte lines."""

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from aqlm_compile.kernels.dense import dense_linear  # noqa: E402
from aqlm_compile.targets.x86 import build, x86_target  # noqa: E402


@pytest.mark.parametrize("weight_dtype", ["float32", "float16", "int8"])
@pytest.mark.parametrize("out_f,in_f,prefetch_bytes", [(516, 96, 48 * 1024), (64, 40, 1024), (36, 64, 0)])
def test_dense_linear_matches_numpy(weight_dtype, out_f, in_f, prefetch_bytes):
    rng = np.random.default_rng(1)
    scaled = weight_dtype == "int8"
    lib = build(dense_linear(out_f, in_f, name="dense", weight_dtype=weight_dtype, row_scales=scaled,
                             prefetch_bytes=prefetch_bytes), x86_target())
    w = (rng.integers(-127, 128, (out_f, in_f)) if scaled else rng.standard_normal((out_f, in_f))).astype(weight_dtype)
    s = (rng.random(out_f) + 0.5).astype(np.float32)
    for tokens in (1, 3):
        x = rng.standard_normal((tokens, in_f)).astype(np.float32)
        y = tvm.runtime.empty((tokens, out_f), "float32", tvm.cpu())
        args = [x, w] + ([s] if scaled else [])
        lib["dense"](*(tvm.runtime.tensor(a) for a in args), y)
        want = x.astype(np.float64) @ w.astype(np.float64).T * (s if scaled else 1)
        np.testing.assert_allclose(y.numpy(), want, rtol=1e-4, atol=1e-3 * np.abs(want).max())
