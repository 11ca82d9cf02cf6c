"""kernels/gemv_lut_vbmi.py (int8 table, vpermi2b lookups, row-tiled codes) and gemm_decode on row-tiled codes,
against the torch reference; the kernel table's choice of layout per layer; a whole model built with it."""

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from aqlm_compile.config import AqlmConfig  # noqa: E402
from aqlm_compile.kernels.gemm_decode import gemm_decode  # noqa: E402
from aqlm_compile.kernels.gemm_vnni import REQUIRED_FEATURES as VNNI_FEATURES  # noqa: E402
from aqlm_compile.kernels.gemv_direct import GemvShape  # noqa: E402
from aqlm_compile.kernels.gemv_lut import OUT_MAJOR  # noqa: E402
from aqlm_compile.kernels.gemv_lut_vbmi import (REQUIRED_FEATURES, ROW_TILED, from_row_tiled,  # noqa: E402
                                                gemv_lut_vbmi, prepared_codebooks, to_row_tiled)
from aqlm_compile.kernels.registry import codes_layout, select_kernel  # noqa: E402
from aqlm_compile.targets.common import target_features  # noqa: E402
from aqlm_compile.targets.x86 import build, x86_target  # noqa: E402

VBMI = frozenset(REQUIRED_FEATURES)
HOST_HAS_VBMI = VBMI <= target_features(x86_target())
HOST_HAS_VNNI = frozenset(VNNI_FEATURES) <= target_features(x86_target())
needs_vbmi = pytest.mark.skipif(not HOST_HAS_VBMI,
                                reason="this CPU lacks AVX-512 VBMI or VNNI: the kernel cannot run here")


def _layer(cfg, out_f, in_f, parts=None, seed=0):
    rng = np.random.default_rng(seed)
    pm = len(parts or [out_f]) * cfg.num_codebooks
    codes = rng.integers(-128, 128, (out_f, in_f // cfg.in_group_size, cfg.num_codebooks), dtype=np.int8)
    cb = (rng.standard_normal((pm, 256, cfg.in_group_size)) * 0.1).astype(np.float16)
    scales = (rng.random(out_f) + 0.5).astype(np.float32)
    bias = rng.standard_normal(out_f).astype(np.float32)
    return codes, cb, scales, bias


def _reference(x, codes, cb, scales, bias, cfg, parts=None):
    """y = x · Ŵᵀ · scale + bias in float64, rows of partition p decoded with codebooks p·M..p·M+M-1."""
    out_f, j, m_count = codes.shape
    bounds = np.cumsum([0, *(parts or [out_f])])
    w = np.zeros((out_f, j, cfg.in_group_size))
    for p in range(len(bounds) - 1):
        rows = slice(bounds[p], bounds[p + 1])
        for m in range(m_count):
            w[rows] += cb[p * m_count + m].astype(np.float64)[codes[rows, :, m].astype(np.int64) & 255]
    return (x.astype(np.float64) @ w.reshape(out_f, -1).T) * scales + bias


def _run(func, x, codes, cb, scales, bias):
    lib = build(func, x86_target())
    y = tvm.runtime.empty((x.shape[0], codes.shape[0]), "float32", tvm.cpu())
    lib["k"](*[tvm.runtime.tensor(np.ascontiguousarray(a)) for a in (x, to_row_tiled(codes), cb, scales, bias)], y)
    return y.numpy()


def test_row_tiled_layout_round_trips_and_keeps_the_shape():
    codes = np.arange(128 * 3 * 2, dtype=np.int64).reshape(128, 3, 2).astype(np.int16)
    tiled = to_row_tiled(codes)
    assert tiled.shape == codes.shape and tiled.dtype == codes.dtype
    assert tiled.reshape(2, 3, 2, 64)[1, 2, 0, 5] == codes[64 + 5, 2, 0]  # tile 1, group 2, codebook 0, row 5
    assert (from_row_tiled(tiled) == codes).all()
    with pytest.raises(ValueError, match="multiple of 64"):
        to_row_tiled(codes[:100])


@needs_vbmi
@pytest.mark.parametrize("out_f,in_f,batch,parts,chunks", [
    (256, 576, 1, None, 8), (576, 256, 3, None, 1), (512, 1024, 1, (256, 256), 8), (1024, 1024, 8, None, 2),
    (960, 576, 1, (576, 192, 192), 8),  # q/k/v: 3 row tiles per pass, one table per partition
    (64, 72, 2, None, 8)])  # 9 input groups: scale blocks of 1, one task
@pytest.mark.parametrize("variant", ["default", "fp32-table", "two-sums", "int8"])
def test_lut_vbmi_matches_reference_within_the_table_rounding(out_f, in_f, batch, parts, chunks, variant):
    """The table rounds each partial dot product to a fraction of its block's bound: 1/4095 by default (whole
    16-bit entries summed in int16, from the integer table or the fp32 one), 1/32767 when each byte plane is summed
    apart (`sum16=False`), 1/127 with one int8 plane. ≤ 2e-3, 1e-3 resp. 2% relative error (random data: ≈ 4.7e-4,
    5e-5 resp. 0.9%), unbiased — a systematic error (wrong code, half, plane, partition, row order or scale) would
    be far larger."""
    cfg = AqlmConfig.parse("2x8g8")
    codes, cb, scales, bias = _layer(cfg, out_f, in_f, parts)
    x = np.random.default_rng(1).standard_normal((batch, in_f)).astype(np.float32)
    shape = GemvShape(out_f, in_f, cfg, batch, partitions=parts)
    kw = {"default": {}, "fp32-table": dict(int_table=False), "two-sums": dict(sum16=False, int_table=False),
          "int8": dict(planes=1, int_table=False)}[variant]
    got = _run(gemv_lut_vbmi(shape, name="k", chunks=chunks, **kw), x, codes, cb, scales, bias)
    want = _reference(x, codes, cb, scales, bias, cfg, list(parts) if parts else None)
    err = np.linalg.norm(got - want) / np.linalg.norm(want)
    if variant == "two-sums":
        assert err < 1e-4, err
    elif variant == "int8":
        assert 1e-4 < err < 0.02, err  # > 1e-4: it really is the int8 table (fp32 would be ~1e-7)
    else:
        assert 5e-5 < err < 2e-3, err  # > 5e-5: it really is the 12-bit table


@needs_vbmi
@pytest.mark.parametrize("config", ["4x8g8", "1x8g8", "8x8g8"])
def test_lut_vbmi_other_codebook_counts(config):
    """JB·M = 8 entries per int16 block sum whatever M (4x8g8: blocks of 2 groups; 1x8g8: 8; 8x8g8: 1)."""
    cfg = AqlmConfig.parse(config)
    codes, cb, scales, bias = _layer(cfg, 256, 512, seed=4)
    x = np.random.default_rng(5).standard_normal((1, 512)).astype(np.float32)
    got = _run(gemv_lut_vbmi(GemvShape(256, 512, cfg, 1), name="k"), x, codes, cb, scales, bias)
    want = _reference(x, codes, cb, scales, bias, cfg)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 2e-3


@needs_vbmi
@pytest.mark.parametrize("config,parts", [("2x8g8", (576, 192, 192)), ("2x8g4", None), ("2x8g16", None),
                                          ("1x8g2", None), ("4x8g6", None)])
def test_lut_vbmi_vector_quantization_equals_the_scalar_loops(config, parts):
    """Each task's int16 codebooks, quantized 16 pairs at a time and shuffled into pair-major order, and x, rounded
    16 inputs at a time, are the scalar loops' exactly (same outputs bit for bit) at every group size that divides 32
    (codebooks) and every scale block of a multiple of 16 inputs (x); 4x8g6 takes the scalar loops either way."""
    cfg = AqlmConfig.parse(config)
    out_f = sum(parts) if parts else 192
    in_f = 576 if cfg.in_group_size != 16 else 512
    in_f -= in_f % cfg.in_group_size
    codes, cb, scales, bias = _layer(cfg, out_f, in_f, parts, seed=7)
    x = np.random.default_rng(8).standard_normal((2, in_f)).astype(np.float32)
    shape = GemvShape(out_f, in_f, cfg, 2, partitions=parts)
    vec = _run(gemv_lut_vbmi(shape, name="k"), x, codes, cb, scales, bias)
    for kw in (dict(vector_codebooks=False), dict(vector_x=False), dict(vector_codebooks=False, vector_x=False)):
        scalar = _run(gemv_lut_vbmi(shape, name="k", **kw), x, codes, cb, scales, bias)
        assert np.array_equal(vec, scalar), kw
    want = _reference(x, codes, cb, scales, bias, cfg, list(parts) if parts else None)
    assert np.linalg.norm(vec - want) / np.linalg.norm(want) < 2e-3


@needs_vbmi
@pytest.mark.parametrize("config,out_f,in_f,parts", [("2x8g8", 960, 576, (576, 192, 192)), ("2x8g8", 256, 1024, None),
                                                     ("4x8g8", 256, 512, None)])
def test_lut_vbmi_with_prepared_codebooks_matches_the_kernel_that_prepares_them(config, out_f, in_f, parts):
    """`prepared_codebooks` (numpy, at build time) gives the kernel the int16 pairs, scales and norm bounds that each
    task otherwise computes per call: the same outputs up to the fp32 rounding of the norm bound (≤ 1e-6 relative),
    and the same accuracy against float64. A wrong pair order, partition or scale would be off by far more."""
    cfg = AqlmConfig.parse(config)
    codes, cb, scales, bias = _layer(cfg, out_f, in_f, parts, seed=9)
    x = np.random.default_rng(10).standard_normal((1, in_f)).astype(np.float32)
    shape = GemvShape(out_f, in_f, cfg, 1, partitions=parts)
    prep = prepared_codebooks(cb, len(parts or [out_f]))
    assert prep.dtype == np.int32 and prep.shape == (cb.size // 2 + 2 * len(parts or [out_f]),)
    got = _run(gemv_lut_vbmi(shape, name="k", prepared=True), x, codes, prep, scales, bias)
    ref_kernel = _run(gemv_lut_vbmi(shape, name="k"), x, codes, cb, scales, bias)
    assert np.abs(got - ref_kernel).max() <= 1e-6 * np.abs(ref_kernel).max()
    want = _reference(x, codes, cb, scales, bias, cfg, list(parts) if parts else None)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 2e-3
    with pytest.raises(ValueError, match="codebooks"):
        prepared_codebooks(cb[..., :7], 1)


@needs_vbmi
def test_lut_vbmi_adversarial_inputs_stay_inside_the_int16_range():
    """The table's scale is a bound, not a measured peak: codewords and inputs built to reach it (one codeword
    parallel to every input group, all with the same sign, one input group far larger than the rest, a spike
    codeword) must not wrap the int16 sums (a wrap would be an error of order 1, not 1e-3)."""
    cfg = AqlmConfig.parse("2x8g8")
    rng = np.random.default_rng(6)
    in_f, out_f = 256, 128
    x = np.abs(rng.standard_normal((1, in_f))).astype(np.float32) + 1.0
    x[0, 8:16] *= 50.0  # one group dominates its block's bound
    cb = (np.abs(rng.standard_normal((2, 256, 8))) * 0.1).astype(np.float16)
    groups = x[0].reshape(-1, 8)
    cb[0, 255] = (groups[0] / np.linalg.norm(groups[0]) * 0.9).astype(np.float16)  # parallel to group 0
    cb[1, 255] = (groups[1] / np.linalg.norm(groups[1]) * 0.9).astype(np.float16)
    cb[1, 0] = 0
    cb[1, 0, 3] = 1.5  # the largest |C| element: a spike codeword
    codes = np.full((out_f, in_f // 8, 2), -1, dtype=np.int8)  # code 255 everywhere: every sum at its extreme
    codes[::2, :, 1] = 0
    scales = np.ones(out_f, np.float32)
    bias = np.zeros(out_f, np.float32)
    got = _run(gemv_lut_vbmi(GemvShape(out_f, in_f, cfg, 1), name="k"), x, codes, cb, scales, bias)
    want = _reference(x, codes, cb, scales, bias, cfg)
    assert np.abs(got - want).max() <= 2e-3 * np.abs(want).max()


@pytest.mark.parametrize("batch", [9, 23, 70])
def test_gemm_decode_reads_row_tiled_codes_exactly(batch):
    cfg = AqlmConfig.parse("2x8g8")
    codes, cb, scales, bias = _layer(cfg, 192, 128, seed=2)
    x = np.random.default_rng(3).standard_normal((batch, 128)).astype(np.float32)
    got = _run(gemm_decode(GemvShape(192, 128, cfg, batch), name="k", code_layout=ROW_TILED),
               x, codes, cb, scales, bias)
    want = _reference(x, codes, cb, scales, bias, cfg)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def test_the_table_picks_the_layout_per_layer_and_target():
    cfg = AqlmConfig.parse("2x8g8")
    big, small = GemvShape(1536, 576, cfg, 1), GemvShape(576, 576, cfg, 1)
    layouts = (OUT_MAJOR, ROW_TILED)
    assert codes_layout(big, "llvm", layouts, VBMI) == ROW_TILED
    assert select_kernel(big, "llvm", (ROW_TILED,), features=VBMI).name == "gemv_lut_vbmi"
    assert select_kernel(GemvShape(1536, 576, cfg, 9), "llvm", (ROW_TILED,), features=VBMI).name == \
        "gemm_decode_row_tiled"
    assert codes_layout(small, "llvm", layouts, VBMI) == ROW_TILED  # 576×576 at batch 1: the table pays off
    assert codes_layout(GemvShape(192, 576, cfg, 1), "llvm", layouts, VBMI) == OUT_MAJOR  # k/v: the direct kernel
    assert select_kernel(GemvShape(576, 576, cfg, 3), "llvm", layouts, features=VBMI).name == "gemv_direct"
    assert select_kernel(GemvShape(576, 576, cfg, 3), "llvm", (ROW_TILED,), features=VBMI).name == "gemv_lut_vbmi"
    assert codes_layout(GemvShape(576, 1536, cfg, 1), "llvm", layouts, VBMI) == ROW_TILED
    assert codes_layout(GemvShape(1536, 576, cfg, 1, partitions=(768, 768)), "llvm", layouts, VBMI) == ROW_TILED
    assert codes_layout(big, "llvm", layouts, frozenset()) == OUT_MAJOR  # a CPU without VBMI (e.g. --cpu znver3)
    assert codes_layout(big, "llvm", (OUT_MAJOR,), VBMI) == OUT_MAJOR  # a caller that cannot repack (the ORT op)
    assert codes_layout(GemvShape(1536, 576, AqlmConfig.parse("1x16g8"), 1), "llvm", layouts, VBMI) == OUT_MAJOR
    assert target_features(x86_target("znver3")) == {"avx2"}  # AVX2, no AVX-512: gemv_lut_avx2's rule
    assert target_features(x86_target("znver4")) >= VBMI | {"avx2", "avx512f"}


@needs_vbmi
def test_a_model_built_with_the_lut_kernel_decodes_the_torch_tokens(tmp_path_factory, tiny_llama):
    """A 2-block Llama with 256 hidden / 1024 FFN (random codes): gate/up/down take the LUT kernel (row-tiled codes
    shared with the prefill GEMM), q/k/v/o the direct one; the TVM runtime's and ORT's greedy tokens are
    PyTorch's."""
    import json

    from click.testing import CliRunner
    from tiny_models import greedy_tokens

    from aqlm_compile.bench.synthetic import make_aqlm_checkpoint, make_fp_model
    from aqlm_compile.cli import main

    root = tmp_path_factory.mktemp("mid")
    fp = make_fp_model(root / "fp", 2, tiny_llama, shapes=dict(
        hidden_size=256, intermediate_size=1024, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256))
    ckpt = make_aqlm_checkpoint(fp, root / "ckpt", "2x8g8")
    art = root / "art"
    r = CliRunner().invoke(main, ["build", str(ckpt), "--target", "x86", "--output", str(art)])
    assert r.exit_code == 0, r.output
    manifest = json.loads((art / "manifest.json").read_text())
    library = manifest["kernels"]  # the ORT op's library: fused gate/up (2 × 1024 rows) and down use the LUT
    # the prompt GEMMs: int8 where the host has AVX-512 VNNI (`build --prefill int8`, the default), else fp32
    gemm = ("gemm_vnni_row_tiled", "gemm_vnni") if HOST_HAS_VNNI else ("gemm_decode_row_tiled", "gemm_decode")
    assert manifest["prefill"] == "int8"
    assert {v["kernel"] for s, v in library.items() if s.endswith("_rt64")} == {"gemv_lut_vbmi", gemm[0]}
    assert "aqlm_gemv_2048x256_b1_p1024-1024_rt64" in library and "aqlm_gemv_256x1024_b1_rt64" in library
    kernels = manifest["tvm"]["kernels"]
    assert {k["kernel"] for s, k in kernels.items() if s.startswith("decode_")} == {"gemv_lut_vbmi", "gemv_direct"}
    # the decode LUT calls read their codebooks prepared at build time (constants of the library)
    lut = [s for s, k in kernels.items() if s.startswith("decode_") and k["kernel"] == "gemv_lut_vbmi"]
    assert lut and all(s.endswith("_prep") and "prepared" in kernels[s]["codebooks"] for s in lut), lut
    assert {k["kernel"] for s, k in kernels.items() if s.startswith("prefill_")} == set(gemm)
    want = greedy_tokens(ckpt, "torch", 12)
    assert greedy_tokens(art, "tvm", 12) == want
    assert greedy_tokens(art, "ort", 12) == want
