"""kernels/gemv_i16_avx2.py (AVX2 decode in int16: 12-bit codebooks and activations, vpmaddwd) against a float64
reference; its rounding error bound; the kernel table's choice on AVX2 CPUs without AVX-512."""

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from aqlm_compile.config import AqlmConfig  # noqa: E402
from aqlm_compile.kernels.gemv_direct import GemvShape  # noqa: E402
from aqlm_compile.kernels.gemv_i16_avx2 import gemv_i16_avx2, unsupported  # noqa: E402
from aqlm_compile.kernels.registry import select_kernel  # noqa: E402
from aqlm_compile.targets.common import target_features  # noqa: E402
from aqlm_compile.targets.x86 import build, x86_target  # noqa: E402
from tests.kernels.test_gemv_lut_vbmi import _reference  # noqa: E402  (float64 Ŵ, partitions)

HOST_HAS_AVX2 = "avx2" in target_features(x86_target())
needs_avx2 = pytest.mark.skipif(not HOST_HAS_AVX2, reason="this CPU lacks AVX2: the kernel cannot run here")


def _layer(cfg, out_f, in_f, parts=None, seed=0):
    rng = np.random.default_rng(seed)
    pm = len(parts or [out_f]) * cfg.num_codebooks
    codes = rng.integers(-128, 128, (out_f, in_f // cfg.in_group_size, cfg.num_codebooks), dtype=np.int8)
    cb = (rng.standard_normal((pm, cfg.codebook_size, cfg.in_group_size)) * 0.1).astype(np.float16)
    if parts:  # partitions of very different scales: each must get its own
        for p in range(len(parts)):
            cb[p * cfg.num_codebooks:(p + 1) * cfg.num_codebooks] *= np.float16(4.0 ** p)
    scales = (rng.random(out_f) + 0.5).astype(np.float32)
    bias = rng.standard_normal(out_f).astype(np.float32)
    return codes, cb, scales, bias


def _run(func, x, codes, cb, scales, bias):
    lib = build(func, x86_target())
    y = tvm.runtime.empty((x.shape[0], codes.shape[0]), "float32", tvm.cpu())
    lib["k"](*[tvm.runtime.tensor(np.ascontiguousarray(a)) for a in (x, codes, cb, scales, bias)], y)
    return y.numpy()


@needs_avx2
@pytest.mark.parametrize("config,out_f,in_f,batch,parts", [
    ("2x8g8", 576, 576, 1, None), ("2x8g8", 256, 1536, 3, None), ("2x8g8", 960, 576, 1, (576, 192, 192)),
    ("2x8g8", 1024, 1024, 8, (512, 512)), ("1x8g8", 128, 96, 2, None), ("4x8g8", 64, 256, 1, None),
    ("2x8g8", 64, 80, 1, None)])  # 80 inputs: activation blocks of 16
def test_i16_avx2_matches_reference_within_its_rounding(config, out_f, in_f, batch, parts):
    """Codebooks rounded to 12 bits of their partition's Σ_m max|C_m|, x to 12 bits of its block's max: the error
    is ≈ 1e-3 of the output's scale on random data (≤ 5e-3 asserted, unbiased: mean within 5e-4). A wrong code,
    codebook, partition, block scale or row would be far larger."""
    cfg = AqlmConfig.parse(config)
    codes, cb, scales, bias = _layer(cfg, out_f, in_f, parts)
    x = np.random.default_rng(1).standard_normal((batch, in_f)).astype(np.float32)
    x[:, 3] *= 30  # an outlier: costs only its own block
    shape = GemvShape(out_f, in_f, cfg, batch, partitions=parts)
    y = _run(gemv_i16_avx2(shape, name="k"), x, codes, cb, scales, bias)
    ref = _reference(x, codes, cb, scales, bias, cfg, parts)
    scale = np.abs(ref - bias).max()
    err = (y - ref) / scale
    assert np.abs(err).max() < 5e-3, np.abs(err).max()
    assert abs(err.mean()) < 5e-4
    assert np.abs(err).max() > 0  # it does round: the test would notice if the fp32 path were built instead


@needs_avx2
def test_i16_avx2_zero_codebooks_and_zero_input_give_the_bias():
    cfg = AqlmConfig.parse("2x8g8")
    codes, cb, scales, bias = _layer(cfg, 64, 128)
    shape = GemvShape(64, 128, cfg, 1)
    func = gemv_i16_avx2(shape, name="k")
    y = _run(func, np.zeros((1, 128), np.float32), codes, cb, scales, bias)
    np.testing.assert_allclose(y[0], bias, rtol=0, atol=1e-6)
    y = _run(func, np.ones((1, 128), np.float32), codes, np.zeros_like(cb), scales, bias)
    np.testing.assert_allclose(y[0], bias, rtol=0, atol=1e-6)


def test_i16_avx2_says_what_it_cannot_run():
    assert "groups of 16" in unsupported(GemvShape(64, 128, AqlmConfig.parse("2x8g16"), 1))
    assert "65536 entries" in unsupported(GemvShape(64, 128, AqlmConfig.parse("1x16g8"), 1))
    with pytest.raises(ValueError, match="gemv_i16_avx2: groups of 16"):
        gemv_i16_avx2(GemvShape(64, 128, AqlmConfig.parse("2x8g16"), 1))


def test_kernel_table_picks_it_on_avx2_without_avx512():
    pick = lambda out_f, in_f, batch, features, config="2x8g8": select_kernel(  # noqa: E731
        GemvShape(out_f, in_f, AqlmConfig.parse(config), batch), "llvm", features=frozenset(features)).name
    for out_f, in_f in ((576, 576), (192, 576), (1536, 576), (576, 1536), (4096, 4096), (11008, 4096)):
        assert pick(out_f, in_f, 1, {"avx2"}) == "gemv_i16_avx2"
        assert pick(out_f, in_f, 4, {"avx2"}) != "gemv_i16_avx2"   # measured slower at batch 4
    assert pick(4096, 4096, 9, {"avx2"}) == "gemm_decode_avx2"                # not a GEMV
    assert pick(64, 128, 1, {"avx2"}) == "gemv_direct"                        # smaller than any layer measured
    assert pick(128, 576, 1, {"avx2"}) != "gemv_i16_avx2"
    assert pick(4096, 4096, 1, {"avx2", "avx512f"}) != "gemv_i16_avx2"      # AVX-512: its own kernels
    assert pick(4096, 4096, 1, set()) == "gemv_direct"                       # no AVX2
    assert pick(4096, 4096, 1, {"avx2"}, "1x16g8") != "gemv_i16_avx2"        # 2^16 codewords


@needs_avx2
@pytest.mark.parametrize("parts", [None, (192, 64, 64)])
def test_i16_avx2_prepared_codebooks_give_the_same_output(parts):
    """`prepared_codebooks` rounds as the kernel does in the call: the prepared variant's output is the same."""
    from aqlm_compile.kernels.gemv_i16_avx2 import prepared_codebooks

    cfg = AqlmConfig.parse("2x8g8")
    out_f = sum(parts) if parts else 256
    codes, cb, scales, bias = _layer(cfg, out_f, 576, parts)
    x = np.random.default_rng(2).standard_normal((2, 576)).astype(np.float32)
    shape = GemvShape(out_f, 576, cfg, 2, partitions=parts)
    prep = prepared_codebooks(cb, len(parts or [out_f]))
    assert prep.dtype == np.int16 and prep.shape == (cb.size + 2 * len(parts or [out_f]),)
    y_call = _run(gemv_i16_avx2(shape, name="k"), x, codes, cb, scales, bias)
    y_prep = _run(gemv_i16_avx2(shape, prepared=True, name="k"), x, codes, prep, scales, bias)
    np.testing.assert_allclose(y_prep, y_call, rtol=0, atol=1e-5 * np.abs(y_call).max())
    with pytest.raises(ValueError, match="P = 2"):
        prepared_codebooks(cb[:1], 2)
