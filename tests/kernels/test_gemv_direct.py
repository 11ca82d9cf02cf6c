"""The TVM CPU GEMV kernel against the pure-torch reference decode, for every config."""

import numpy as np
import pytest
import torch

tvm = pytest.importorskip("tvm")

from aqlm_compile.config import AqlmConfig  # noqa: E402
from aqlm_compile.nn import AqlmLinear  # noqa: E402
from aqlm_compile.kernels.gemv_direct import GemvShape, gemv_direct  # noqa: E402
from aqlm_compile.targets.x86 import build, x86_target  # noqa: E402


def random_layer(cfg, out_f, in_f, seed=0):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, cfg.codebook_size, (out_f, in_f // cfg.in_group_size, cfg.num_codebooks), generator=gen)
    cb = (torch.randn(cfg.num_codebooks, cfg.codebook_size, 1, cfg.in_group_size, generator=gen) * 0.1).half().float()
    scales = torch.rand(out_f, generator=gen) + 0.5
    bias = torch.randn(out_f, generator=gen)
    return AqlmLinear.from_parts(codes, cb, scales, cfg, bias)


@pytest.mark.parametrize("cfg", ["1x16g8", "2x8g8", "1x8g8", "8x8g32", "2x12g8", "4x8g16", "2x8g4", "3x6g8"])
@pytest.mark.parametrize("batch", [1, 3])
def test_matches_torch_reference_fp32(cfg, batch):
    config = AqlmConfig.parse(cfg)
    out_f, in_f = 96, 256
    layer = random_layer(config, out_f, in_f)
    x = torch.randn(batch, in_f, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = (x.double() @ layer.weight().double().T + layer.bias.double()).float()
    lib = build(gemv_direct(GemvShape(out_f, in_f, config, batch)), x86_target())
    dev = tvm.cpu()
    args = [x.numpy(), layer.codes.numpy(), layer.codebooks.detach().reshape(config.num_codebooks, config.codebook_size, -1).half().numpy(),
            layer.scales.detach().reshape(-1).numpy(), layer.bias.detach().numpy()]
    tensors = [tvm.runtime.tensor(np.ascontiguousarray(a), dev) for a in args]
    y = tvm.runtime.empty((batch, out_f), "float32", dev)
    lib["aqlm_gemv"](*tensors, y)
    err = (torch.from_numpy(y.numpy()) - ref).abs().max() / ref.abs().max()
    assert err <= 1e-5, err


@pytest.mark.parametrize("cfg", ["2x8g8", "1x16g8", "8x8g32"])
def test_matches_torch_reference_fp16(cfg):
    config = AqlmConfig.parse(cfg)
    out_f, in_f, batch = 64, 256, 2
    layer = random_layer(config, out_f, in_f, seed=2)
    x = torch.randn(batch, in_f, generator=torch.Generator().manual_seed(3)).half()
    with torch.no_grad():
        ref = x.double() @ layer.weight().double().T + layer.bias.double()
    lib = build(gemv_direct(GemvShape(out_f, in_f, config, batch, act_dtype="float16")), x86_target())
    dev = tvm.cpu()
    args = [x.numpy(), layer.codes.numpy(),
            layer.codebooks.detach().reshape(config.num_codebooks, config.codebook_size, -1).half().numpy(),
            layer.scales.detach().reshape(-1).numpy(), layer.bias.detach().numpy()]
    tensors = [tvm.runtime.tensor(np.ascontiguousarray(a), dev) for a in args]
    y = tvm.runtime.empty((batch, out_f), "float16", dev)
    lib["aqlm_gemv"](*tensors, y)
    err = (torch.from_numpy(y.numpy()).double() - ref).abs().max() / ref.abs().max()
    assert err <= 2e-3, err
