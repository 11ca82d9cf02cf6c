import pytest
import torch

from aqlm_compile.config import AqlmConfig
from aqlm_compile.quantize.codebook_update import solve_codebooks, solve_scales, update_codebooks
from aqlm_compile.quantize.layer import init_codes, quantize_weight
from aqlm_compile.quantize.objective import layer_loss
from aqlm_compile.quantize.presets import get_preset


def layer(out_f=48, in_f=128, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=gen)
    x = torch.randn(in_f, 1024, generator=gen)
    x[3] *= 30  # an outlier input channel, as small LMs have
    return w, x @ x.T / 1024


@pytest.mark.parametrize("cfg", ["1x16g8", "2x8g8", "1x8g8", "8x8g32", "2x12g8", "2x16g8", "4x4g4"])
def test_every_config_quantizes(cfg):
    w, h = layer()
    config = AqlmConfig.parse(cfg)
    settings = get_preset("tiny", max_rounds=3, kmeans_iters=5, relative_tolerance=0.0)
    result = quantize_weight(w, h, config, settings, torch.Generator().manual_seed(0))
    assert result.codes.shape == (48, 128 // config.in_group_size, config.num_codebooks)
    assert result.codes.min() >= 0 and result.codes.max() < config.codebook_size
    assert result.codebooks.shape == (config.num_codebooks, config.codebook_size, 1, config.in_group_size)
    if config.codebook_size * config.num_codebooks >= w.numel() // config.in_group_size:
        # more codewords than weight groups (1x16 on a small layer): k-means alone represents W exactly
        assert result.relative_error < 1e-6
    else:
        # the alternation improves on the k-means initialisation and stays finite
        assert result.losses[-1] < result.losses[0]
        assert 0 < result.relative_error < 1


@pytest.mark.parametrize("solver", ["cg", "adam"])
def test_codebook_update_lowers_loss(solver):
    w, h = layer()
    config = AqlmConfig.parse("2x4g8")
    codes, cb, s = init_codes(w, config, get_preset("tiny"), torch.Generator().manual_seed(0))
    before = layer_loss(w, h, codes, cb, s)
    if solver == "cg":
        cb = solve_codebooks(w, h, codes, cb, s, 20)
        s = solve_scales(w, h, codes, cb)
    else:
        cb, s = update_codebooks(w, h, codes, cb, s, 50, 1e-3)
    assert layer_loss(w, h, codes, cb, s) < 0.95 * before


def test_cg_reaches_least_squares_optimum():
    # with codes fixed the loss is quadratic in the codebooks: compare with a dense normal-equation solve
    w, h = layer(8, 16)
    config = AqlmConfig.parse("1x2g4")
    codes, cb, s = init_codes(w, config, get_preset("tiny"), torch.Generator().manual_seed(0))
    cg = solve_codebooks(w.double(), h.double(), codes, cb.double(), s.double(), 100)
    from aqlm_compile.nn import decode_weight

    basis = torch.eye(cb.numel(), dtype=torch.float64)
    cols = torch.stack([decode_weight(codes, b.view_as(cb), s.double()).flatten() for b in basis], 1)
    kron = torch.kron(torch.eye(8, dtype=torch.float64), h.double())
    a = cols.T @ kron @ cols
    rhs = cols.T @ kron @ w.double().flatten()
    exact = torch.linalg.lstsq(a, rhs).solution
    loss = lambda c: layer_loss(w.double(), h.double(), codes, c.view_as(cb), s.double())
    assert loss(cg) == pytest.approx(loss(exact), rel=1e-6)
