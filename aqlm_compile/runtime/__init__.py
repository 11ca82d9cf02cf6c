"""Loading built artifacts with runtimes only (no torch, no TVM compiler)."""

import numpy as np


def aligned_array(n: int, dtype) -> np.ndarray:
    """A 1-D numpy array of `n` elements whose data is 64-byte aligned: what the compiled kernels assume
    (docs/tvm-and-ort-notes.md N6) and what `tvm.runtime.from_dlpack` accepts."""
    buf = np.empty(n + 64, dtype)
    start = (-buf.ctypes.data % 64) // buf.itemsize
    return buf[start:start + n]
