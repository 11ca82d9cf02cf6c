"""The TVM CPU kernels (direct GEMV, LUT GEMV, prefill GEMM) against the pure-torch reference decode, every config."""

import numpy as np
import pytest
import torch

tvm = pytest.importorskip("tvm")

from aqlm_compile.config import AqlmConfig  # noqa: E402
from aqlm_compile.kernels.gemm_decode import gemm_decode  # noqa: E402
from aqlm_compile.kernels.gemv_direct import GemvShape, gemv_direct  # noqa: E402
from aqlm_compile.kernels.gemv_lut import gemv_lut, gemv_lut_grouped, gemv_lut_split, to_group_major  # noqa: E402
from aqlm_compile.kernels.registry import AVX2_GEMM_TILING, select_kernel  # noqa: E402
from aqlm_compile.nn import AqlmLinear  # noqa: E402
from aqlm_compile.targets.x86 import build, x86_target  # noqa: E402

CONFIGS = ["1x16g8", "2x8g8", "1x8g8", "8x8g32", "2x12g8", "4x8g16", "2x8g4", "3x6g8", "2x16g8"]
KERNELS = {"direct": gemv_direct, "lut": gemv_lut, "lut_grouped": gemv_lut_grouped, "lut_split": gemv_lut_split,
           "gemm": gemm_decode,
           # the AVX2 hosts' tiling (kernels/registry.py); plain AVX2 code, so it runs on any x86-64 host with AVX2
           "gemm_avx2": lambda shape, name: gemm_decode(shape, name=name, **AVX2_GEMM_TILING)}
LUTS = ("lut", "lut_grouped", "lut_split")


def codes_for(kernel, codes: np.ndarray) -> np.ndarray:
    """The codes in the layout `kernel` reads (the grouped LUT: [in/g, out, M])."""
    return to_group_major(codes) if kernel == "lut_grouped" else codes


def random_layer(cfg, out_f, in_f, seed=0):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, cfg.codebook_size, (out_f, in_f // cfg.in_group_size, cfg.num_codebooks), generator=gen)
    cb = (torch.randn(cfg.num_codebooks, cfg.codebook_size, 1, cfg.in_group_size, generator=gen) * 0.1).half().float()
    scales = torch.rand(out_f, generator=gen) + 0.5
    bias = torch.randn(out_f, generator=gen)
    return AqlmLinear.from_parts(codes, cb, scales, cfg, bias)


def run_kernel(kernel, config, layer, x, act_dtype="float32"):
    out_f, in_f, batch = layer.out_features, layer.in_features, x.shape[0]
    lib = build(KERNELS[kernel](GemvShape(out_f, in_f, config, batch, act_dtype=act_dtype), name="k"), x86_target())
    dev = tvm.cpu()
    args = [x.numpy(), codes_for(kernel, layer.codes.numpy()),
            layer.codebooks.detach().reshape(config.num_codebooks, config.codebook_size, -1).half().numpy(),
            layer.scales.detach().reshape(-1).numpy(), layer.bias.detach().numpy()]
    tensors = [tvm.runtime.tensor(np.ascontiguousarray(a), dev) for a in args]
    y = tvm.runtime.empty((batch, out_f), act_dtype, dev)
    lib["k"](*tensors, y)
    return torch.from_numpy(y.numpy()).double()


def cases():
    for cfg in CONFIGS:
        for kernel, batches in (("direct", [1, 3]), ("lut", [1, 3]), ("lut_grouped", [1, 3]), ("lut_split", [1, 2]),
                                ("gemm", [1, 9, 21, 64, 71]),  # ≥ 64: the outer-product schedule
                                ("gemm_avx2", [2, 9, 32, 71])):  # from 4 there, 8×8 transposes (g = 8)
            if kernel in LUTS and AqlmConfig.parse(cfg).codebook_size > 256:
                continue  # the table would hold 2^B entries per input group
            for batch in batches:
                yield cfg, kernel, batch


@pytest.mark.parametrize("cfg,kernel,batch", list(cases()))
def test_matches_torch_reference_fp32(cfg, kernel, batch):
    config = AqlmConfig.parse(cfg)
    layer = random_layer(config, 96, 256)
    x = torch.randn(batch, 256, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = x.double() @ layer.weight().double().T + layer.bias.double()
    y = run_kernel(kernel, config, layer, x)
    err = ((y - ref).abs().max() / ref.abs().max()).item()
    assert err <= 1e-5, err


@pytest.mark.parametrize("cfg,kernel", [(c, k) for c in ["2x8g8", "1x16g8", "8x8g32"] for k in KERNELS
                                        if not (k in LUTS and c == "1x16g8")])
def test_matches_torch_reference_fp16(cfg, kernel):
    config = AqlmConfig.parse(cfg)
    layer = random_layer(config, 64, 256, seed=2)
    x = torch.randn(2 if not kernel.startswith("gemm") else 11, 256, generator=torch.Generator().manual_seed(3)).half()
    with torch.no_grad():
        ref = x.double() @ layer.weight().double().T + layer.bias.double()
    y = run_kernel(kernel, config, layer, x, act_dtype="float16")
    err = ((y - ref).abs().max() / ref.abs().max()).item()
    assert err <= 2e-3, err


def test_gemm_is_one_function_for_any_token_count():
    config = AqlmConfig.parse("2x8g8")
    layer = random_layer(config, 64, 128, seed=4)
    lib = build(gemm_decode(GemvShape(64, 128, config, 1), name="k"), x86_target())
    dev = tvm.cpu()
    cb = layer.codebooks.detach().reshape(2, 256, -1).half().numpy()
    weights = [tvm.runtime.tensor(np.ascontiguousarray(a), dev)
               for a in (layer.codes.numpy(), cb, layer.scales.detach().reshape(-1).numpy(), layer.bias.detach().numpy())]
    for n in (1, 4, 5, 64, 130):
        x = torch.randn(n, 128, generator=torch.Generator().manual_seed(n))
        y = tvm.runtime.empty((n, 64), "float32", dev)
        lib["k"](tvm.runtime.tensor(x.numpy(), dev), *weights, y)
        with torch.no_grad():
            ref = x.double() @ layer.weight().double().T + layer.bias.double()
        assert ((torch.from_numpy(y.numpy()).double() - ref).abs().max() / ref.abs().max()).item() <= 1e-5


def test_registry_choices():
    pick = lambda cfg, out_f, batch, kind="llvm": select_kernel(  # noqa: E731
        GemvShape(out_f, 4096, AqlmConfig.parse(cfg), batch), kind).name
    assert pick("2x8g8", 4096, 1) == "gemv_direct"
    assert pick("1x16g8", 4096, 8) == "gemv_direct"
    assert pick("8x8g32", 4096, 1) == "gemv_lut"      # 128 KiB of codebooks: decode is the bottleneck
    from aqlm_compile.kernels.gemv_lut import GROUP_MAJOR, OUT_MAJOR
    grouped = select_kernel(GemvShape(4096, 4096, AqlmConfig.parse("8x8g32"), 1), "llvm", (OUT_MAJOR, GROUP_MAJOR))
    assert (grouped.name, grouped.code_layout) == ("gemv_lut_grouped", GROUP_MAJOR)  # where the caller can repack
    assert select_kernel(GemvShape(4096, 4096, AqlmConfig.parse("2x8g8"), 1), "llvm",
                         (OUT_MAJOR, GROUP_MAJOR)).code_layout == OUT_MAJOR
    assert pick("8x8g32", 576, 1) == "gemv_direct"    # table (8·256 per group) too big for 576 outputs
    assert pick("2x8g8", 4096, 9) == "gemm_decode"
    # AVX2 without AVX-512: 8-dim codewords of ≤ 256 entries decode in int16 at batch 1 (gemv_i16_avx2: faster than
    # the fp32 tables below on Zen 3, docs N41); the tables stay for other batches and what it cannot run
    avx2 = lambda out_f, in_f, batch, features, cfg="2x8g8": select_kernel(  # noqa: E731
        GemvShape(out_f, in_f, AqlmConfig.parse(cfg), batch), "llvm", features=features).name
    for out_f, in_f in ((4096, 4096), (4096, 11008), (1536, 576), (3072, 576), (192, 576)):
        assert avx2(out_f, in_f, 1, {"avx2"}) == "gemv_i16_avx2"
    # smaller than any layer it was measured on: the rules below
    assert avx2(96, 576, 1, {"avx2"}) == "gemv_direct"            # too few rows for the table
    assert avx2(256, 256, 1, {"avx2"}) == "gemv_direct"           # narrow input: few tiles of little work
    # at batch 4 it was slower than the tables and direct decoding (kernels-vs-206362d.md): batch 1 only
    assert avx2(4096, 4096, 2, {"avx2"}) == "gemv_lut_avx2"
    assert avx2(576, 1536, 4, {"avx2"}) == "gemv_direct"
    # Zen 1's fp32-table rules, for a config the int16 decode does not take (16-dim groups)
    assert avx2(4096, 4096, 1, {"avx2"}, "2x8g16") == "gemv_lut_avx2"
    assert avx2(1536, 576, 1, {"avx2"}, "2x8g16") == "gemv_lut_split_avx2"
    assert avx2(576, 1536, 3, {"avx2"}, "2x8g16") == "gemv_direct"
    assert avx2(576, 576, 1, {"avx2", "avx512f"}) == "gemv_direct"
    assert avx2(4096, 4096, 1, {"avx2", "avx512f"}) == "gemv_direct"  # AVX-512 decodes fast enough
    assert avx2(4096, 4096, 1, set()) == "gemv_direct"
    # prompt GEMMs on AVX2: gemm_decode with 16-register tiling (docs N42), on the layers it was measured on
    assert avx2(4096, 4096, 9, {"avx2"}) == "gemm_decode_avx2"
    assert avx2(1536, 576, 512, {"avx2"}) == "gemm_decode_avx2"
    assert avx2(128, 64, 9, {"avx2"}) == "gemm_decode"            # the tiny test models' layers: as before
    assert avx2(1536, 576, 512, {"avx2", "avx512f"}) == "gemm_decode"
    assert not avx2(1536, 576, 8, {"avx2"}).startswith("gemm")     # 8 tokens: a GEMV batch
    assert pick("2x8g8", 4096, 4, "cuda") == "gemv_cuda"
    from aqlm_compile.errors import ConfigError
    with pytest.raises(ConfigError, match="CUDA has the GEMV kernel only"):
        pick("2x8g8", 4096, 16, "cuda")
    with pytest.raises(ConfigError, match="target kind 'opencl'"):
        pick("2x8g8", 4096, 1, "opencl")


@pytest.mark.parametrize("kernel", ["direct", "lut", "lut_grouped", "lut_split", "gemm"])
@pytest.mark.parametrize("cfg", ["2x8g8", "1x16g8", "8x8g32"])
def test_partitioned_kernels_match_separate_layers(kernel, cfg):
    """A fused layer (rows 0..31 one layer, 32..95 another, each with its own codebooks) equals the two layers."""
    config = AqlmConfig.parse(cfg)
    if kernel in LUTS and config.codebook_size > 256:
        return  # never selected for 1x16
    parts = [random_layer(config, 32, 256, seed=5), random_layer(config, 64, 256, seed=6)]
    x = torch.randn(3 if kernel != "gemm" else 70, 256, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref = torch.cat([x.double() @ p.weight().double().T + p.bias.double() for p in parts], dim=1)
    shape = GemvShape(96, 256, config, x.shape[0], partitions=(32, 64))
    lib = build(KERNELS[kernel](shape, name="k"), x86_target())
    dev = tvm.cpu()
    cb = torch.cat([p.codebooks.detach().reshape(config.num_codebooks, config.codebook_size, -1) for p in parts])
    args = [x.numpy(), codes_for(kernel, torch.cat([p.codes for p in parts]).numpy()), cb.half().numpy(),
            torch.cat([p.scales.detach().reshape(-1) for p in parts]).numpy(),
            torch.cat([p.bias.detach() for p in parts]).numpy()]
    y = tvm.runtime.empty((x.shape[0], 96), "float32", dev)
    lib["k"](*[tvm.runtime.tensor(np.ascontiguousarray(a), dev) for a in args], y)
    err = ((torch.from_numpy(y.numpy()).double() - ref).abs().max() / ref.abs().max()).item()
    assert err <= 1e-5, err


@pytest.mark.parametrize("max_tasks,tasks", [(None, 4), (2, 2), (1, 1)])
def test_lut_split_tiles_grow_to_the_task_limit(max_tasks, tasks):
    """gemv_lut_split with fewer tasks than 16 KiB tiles: the tiles grow (2x8g8, in 256: four 8-group tiles → two of
    16 groups → one of 32) and the result does not change."""
    from aqlm_compile.kernels.gemv_lut import _split_tile

    config = AqlmConfig.parse("2x8g8")
    layer = random_layer(config, 96, 256, seed=8)
    shape = GemvShape(96, 256, config, 1)
    assert 256 // 8 // _split_tile(shape, max_tasks=max_tasks) == tasks
    lib = build(gemv_lut_split(shape, max_tasks=max_tasks, name="k"), x86_target())
    dev = tvm.cpu()
    x = torch.randn(1, 256, generator=torch.Generator().manual_seed(9))
    args = [x.numpy(), layer.codes.numpy(), layer.codebooks.detach().reshape(2, 256, -1).half().numpy(),
            layer.scales.detach().reshape(-1).numpy(), layer.bias.detach().numpy()]
    y = tvm.runtime.empty((1, 96), "float32", dev)
    lib["k"](*[tvm.runtime.tensor(np.ascontiguousarray(a), dev) for a in args], y)
    with torch.no_grad():
        ref = x.double() @ layer.weight().double().T + layer.bias.double()
    assert ((torch.from_numpy(y.numpy()).double() - ref).abs().max() / ref.abs().max()).item() <= 1e-5
