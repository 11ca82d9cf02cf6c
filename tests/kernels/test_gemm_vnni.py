"""kernels/gemm_vnni.py (int8 prompt GEMM on AVX-512 VNNI): equal to a numpy emulation of its quantization, close
to the exact product, both codes layouts, partitions, any token count; the kernel table picks it only with the
build's consent (`build --prefill`)."""

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from aqlm_compile.config import AqlmConfig  # noqa: E402
from aqlm_compile.kernels.gemm_vnni import GQ, INT8_ACTIVATIONS, REQUIRED_FEATURES, gemm_vnni  # noqa: E402
from aqlm_compile.kernels.gemv_direct import GemvShape  # noqa: E402
from aqlm_compile.kernels.gemv_lut import OUT_MAJOR  # noqa: E402
from aqlm_compile.kernels.gemv_lut_vbmi import ROW_TILED, to_row_tiled  # noqa: E402
from aqlm_compile.kernels.registry import MAX_GEMV_BATCH, select_kernel  # noqa: E402
from aqlm_compile.targets.common import kernel_features, target_features  # noqa: E402
from aqlm_compile.targets.x86 import build, x86_target  # noqa: E402

HOST_HAS_VNNI = frozenset(REQUIRED_FEATURES) <= target_features(x86_target())
needs_vnni = pytest.mark.skipif(not HOST_HAS_VNNI, reason="this CPU lacks AVX-512 VNNI: the kernel cannot run here")


def _layer(cfg, out_f, in_f, parts=None, seed=0):
    rng = np.random.default_rng(seed)
    pm = len(parts or [out_f]) * cfg.num_codebooks
    k = cfg.codebook_size
    codes = rng.integers(0, k, (out_f, in_f // cfg.in_group_size, cfg.num_codebooks))
    codes = codes.astype(np.int8 if k <= 256 else np.int16)  # wraps, as HF stores codes (the kernels mask them)
    cb = (rng.standard_normal((pm, k, cfg.in_group_size)) * 0.1).astype(np.float16)
    scales = (rng.random(out_f) + 0.5).astype(np.float32)
    bias = rng.standard_normal(out_f).astype(np.float32)
    return codes, cb, scales, bias


def _decoded(codes, cb, cfg, parts=None):
    """Ŵ before the row scale, fp32 (as the kernel decodes it), rows of partition p from codebooks p·M..p·M+M-1."""
    out_f, j, m_count = codes.shape
    bounds = np.cumsum([0, *(parts or [out_f])])
    w = np.zeros((out_f, j, cfg.in_group_size), np.float32)
    for p in range(len(bounds) - 1):
        rows = slice(bounds[p], bounds[p + 1])
        for m in range(m_count):
            index = codes[rows, :, m].astype(np.int64) & (cfg.codebook_size - 1)
            w[rows] += cb[p * m_count + m].astype(np.float32)[index]
    return w.reshape(out_f, -1)


def _int8(a):
    """Symmetric absmax int8 per row and group of GQ, as the kernel rounds (fp32 127/absmax, ties to even)."""
    g = a.reshape(a.shape[0], -1, GQ)
    amax = np.abs(g).max(-1, keepdims=True)
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    return np.rint(g * inv).astype(np.int64), (amax / np.float32(127)).astype(np.float64)


def _emulated(x, w, scales, bias):
    """The kernel's arithmetic in numpy: Σ_group sx·sw·(xq·wq), exact integer dots."""
    xq, sx = _int8(x)
    wq, sw = _int8(w)
    dots = np.einsum("ngk,ogk->nog", xq, wq).astype(np.float64)
    return (dots * sx[:, None, :, 0] * sw[None, :, :, 0]).sum(-1) * scales + bias


def _run(func, x, codes, cb, scales, bias, layout=OUT_MAJOR):
    lib = build(func, x86_target())
    y = tvm.runtime.empty((x.shape[0], codes.shape[0]), "float32", tvm.cpu())
    codes = to_row_tiled(codes) if layout == ROW_TILED else codes
    lib["k"](*[tvm.runtime.tensor(np.ascontiguousarray(a)) for a in (x, codes, cb, scales, bias)], y)
    return y.numpy()


@needs_vnni
@pytest.mark.parametrize("cfg_name,out_f,in_f,tokens,parts,layout", [
    ("2x8g8", 128, 576, (9, 64, 71), None, ROW_TILED),  # 9 groups of 64: tiles of 64·3 inputs
    ("2x8g8", 96, 256, (13,), None, OUT_MAJOR),  # 96 rows: blocks of 32
    ("2x8g8", 256, 512, (21,), (64, 128, 64), ROW_TILED),  # a fused layer: partitions with their own codebooks
    ("1x16g8", 64, 128, (10,), None, OUT_MAJOR),  # 16-bit codes: decoded from the fp16 codebook, not widened
    ("4x8g16", 64, 192, (9,), None, OUT_MAJOR),
    ("8x8g32", 64, 256, (12,), None, OUT_MAJOR),
])
def test_gemm_vnni_equals_its_int8_emulation(cfg_name, out_f, in_f, tokens, parts, layout):
    """Equal to the numpy emulation up to fp32 accumulation (a wrong byte, group, scale, offset correction,
    partition or token would be off by far more), and within int8 rounding of the exact product."""
    cfg = AqlmConfig.parse(cfg_name)
    codes, cb, scales, bias = _layer(cfg, out_f, in_f, list(parts) if parts else None)
    w = _decoded(codes, cb, cfg, list(parts) if parts else None)
    func = gemm_vnni(GemvShape(out_f, in_f, cfg, MAX_GEMV_BATCH + 1, partitions=parts), name="k", code_layout=layout)
    for n in tokens:
        x = np.random.default_rng(n).standard_normal((n, in_f)).astype(np.float32)
        x[0, :GQ] = 0  # an all-zero group: scale 0, no division by zero
        got = _run(func, x, codes, cb, scales, bias, layout)
        want = _emulated(x, w, scales, bias)
        assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max(), (n, np.abs(got - want).max())
        exact = (x.astype(np.float64) @ w.astype(np.float64).T) * scales + bias
        err = np.linalg.norm(got - exact) / np.linalg.norm(exact)
        assert err < 2e-2, err


def test_the_table_picks_the_int8_gemm_only_with_consent():
    cfg = AqlmConfig.parse("2x8g8")
    shape = GemvShape(1536, 576, cfg, MAX_GEMV_BATCH + 1)
    cpu = frozenset(REQUIRED_FEATURES)
    assert select_kernel(shape, "llvm", (OUT_MAJOR,), features=cpu | {INT8_ACTIVATIONS}).name == "gemm_vnni"
    assert select_kernel(shape, "llvm", (ROW_TILED,), features=cpu | {INT8_ACTIVATIONS}).name == "gemm_vnni_row_tiled"
    assert select_kernel(shape, "llvm", (OUT_MAJOR,), features=cpu).name == "gemm_decode"  # --prefill fp32
    assert select_kernel(shape, "llvm", (OUT_MAJOR,), features=frozenset({INT8_ACTIVATIONS})).name == "gemm_decode"
    odd = GemvShape(1536, 72 * 8, cfg, MAX_GEMV_BATCH + 1)  # 576 inputs but fp16 activations
    assert select_kernel(GemvShape(odd.out_features, odd.in_features, cfg, odd.batch, act_dtype="float16"), "llvm",
                         (OUT_MAJOR,), features=cpu | {INT8_ACTIVATIONS}).name == "gemm_decode"
    assert select_kernel(GemvShape(64, 520, AqlmConfig.parse("1x8g8"), MAX_GEMV_BATCH + 1), "llvm", (OUT_MAJOR,),
                         features=cpu | {INT8_ACTIVATIONS}).name == "gemm_decode"  # 520 inputs: not groups of 64
    assert select_kernel(GemvShape(1536, 576, cfg, 1), "llvm", (OUT_MAJOR,),
                         features=cpu | {INT8_ACTIVATIONS}).name != "gemm_vnni"  # a GEMV batch


def test_kernel_features_add_the_consent_only_for_int8():
    target = x86_target("sapphirerapids")
    assert INT8_ACTIVATIONS in kernel_features(target, "int8")
    assert INT8_ACTIVATIONS not in kernel_features(target, "fp32")
    assert frozenset(REQUIRED_FEATURES) <= kernel_features(target, "fp32")
    assert not frozenset(REQUIRED_FEATURES) <= kernel_features(x86_target("znver3"), "int8")
