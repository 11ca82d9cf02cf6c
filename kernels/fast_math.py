"""Vectorizable float32 math for CPU kernels written in TIR: LLVM turns `exp` on a vector into one libm call per
lane, so kernels that take exponentials of whole vectors (the attention's softmax, SiLU) build it from this
polynomial instead."""

from __future__ import annotations

from tvm.script import tirx as T

LOG2E = 1.4426950408889634
LN2_HI, LN2_LO = 0.693359375, -2.12194440e-4
EXP_POLY = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)
NEG_BIG = -3.0e38  # a softmax's running max before any key: finite, so max - NEG_BIG never makes inf - inf


def fast_exp(x):
    """exp(x) for float32 x (the softmax's x − max ≤ 0): Cephes expf, range-reduced by powers of 2; x is clamped to
    [−87, 88], so below −87 it returns ≈ 1e-38 rather than 0 (callers zero the masked keys themselves) and it is
    always finite (a masked key's weight is then exactly 0 · finite)."""
    x = T.min(T.max(x, T.float32(-87.0)), T.float32(88.0))
    n = T.floor(x * T.float32(LOG2E) + T.float32(0.5))
    r = x - n * T.float32(LN2_HI) - n * T.float32(LN2_LO)
    p = T.float32(EXP_POLY[0])
    for c in EXP_POLY[1:]:
        p = p * r + T.float32(c)
    y = p * r * r + r + T.float32(1.0)
    return y * T.reinterpret("float32", T.shift_left(T.Cast("int32", n) + 127, 23))
