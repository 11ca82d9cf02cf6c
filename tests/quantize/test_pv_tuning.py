"""PV-tuning (`quantize/pv_tuning.py`, `--preset pv`, `quantize --from-checkpoint`)."""

import itertools

import pytest
import torch
from click.testing import CliRunner

from aqlm_compile import format as fmt
from aqlm_compile.cli import main
from aqlm_compile.config import AqlmConfig
from aqlm_compile.jobs import quantize_job
from aqlm_compile.nn import AqlmLinear, decode_weight
from aqlm_compile.quantize.pv_tuning import _StraightThrough, reencode_l2

PV_TINY = {"nsamples": 8, "val_size": 2, "seqlen": 32, "pv_steps": 6, "pv_batch_size": 2, "pv_lr": 1e-3,
           "pv_code_lr": 5e-2, "pv_max_code_change": 0.05}


def _layer(seed=0, out=6, inp=8, config="2x2g2"):
    g = torch.Generator().manual_seed(seed)
    cfg = AqlmConfig.parse(config)
    m, k, gs = cfg.num_codebooks, cfg.codebook_size, cfg.in_group_size
    codes = torch.randint(0, k, (out, inp // gs, m), generator=g)
    layer = AqlmLinear.from_parts(codes, torch.randn(m, k, 1, gs, generator=g), torch.rand(out, generator=g) + 0.5, cfg)
    return layer.requires_grad_(False)


def test_reencode_never_worsens_a_group_and_reports_its_gain():
    layer = _layer()
    codes = layer.unpacked_codes()
    target = torch.randn(6, 8, generator=torch.Generator().manual_seed(1))
    new, gain = reencode_l2(target, codes, layer.codebooks, layer.scales, order=[1, 0])
    old_w = decode_weight(codes, layer.codebooks, layer.scales)
    new_w = decode_weight(new, layer.codebooks, layer.scales)
    err = lambda w: (target - w).pow(2).reshape(6, 4, 2).sum(-1)  # noqa: E731  per (row, group)
    assert torch.allclose(gain, err(old_w) - err(new_w), atol=1e-4)
    assert torch.all(gain >= -1e-5)
    # each slot is the exact best given the other (brute force over K for the last codebook visited)
    books = layer.codebooks.reshape(2, 4, 2)
    s = layer.scales.reshape(-1, 1)
    for o, j in itertools.product(range(6), range(4)):
        rest = books[1][new[o, j, 1]]
        t = target[o, 2 * j : 2 * j + 2] / s[o]
        best = min(range(4), key=lambda c: float((t - rest - books[0][c]).pow(2).sum()))
        assert (t - rest - books[0][new[o, j, 0]]).pow(2).sum() <= (t - rest - books[0][best]).pow(2).sum() + 1e-6
    # a target the layer already represents exactly: nothing to gain
    _, none = reencode_l2(old_w, codes, layer.codebooks, layer.scales, order=[0, 1])
    assert none.abs().max() < 1e-5


def test_weighted_reencode_is_exact_per_slot_in_its_norm():
    """reencode_groups(weights=w): each slot is the best codeword in Σ w (t − ĉ)² given the others, the gain is that
    norm's drop, and a column of weight 0 does not count."""
    from aqlm_compile.quantize.pv_tuning import reencode_groups

    g = torch.Generator().manual_seed(5)
    books = torch.randn(2, 4, 2, generator=g)
    t = torch.randn(40, 2, generator=g)
    codes = torch.randint(0, 4, (40, 2), generator=g)
    w = torch.rand(40, 2, generator=g)
    w[:, 1] = 0.0
    new, gain = reencode_groups(t, codes, books, order=[0, 1], weights=w)
    err = lambda c: ((t - books[0][c[:, 0]] - books[1][c[:, 1]]).pow(2) * w).sum(-1)  # noqa: E731
    assert torch.allclose(gain, err(codes) - err(new), atol=1e-5) and torch.all(gain >= -1e-6)
    for n in range(40):  # codebook 1, visited last, is the exact best given codebook 0's slot
        r = t[n] - books[0][new[n, 0]]
        costs = [float(((r - books[1][k]).pow(2) * w[n]).sum()) for k in range(4)]
        assert costs[new[n, 1]] <= min(costs) + 1e-6
    # only column 0 counts: the first coordinate alone decides
    plain, _ = reencode_groups(t[:, :1], codes, books[:, :, :1], order=[0, 1])
    assert torch.allclose(err(new), err(plain), atol=1e-5)


def test_code_step_changes_at_most_the_allowed_fraction():
    layer = _layer(out=64, inp=16)
    st = _StraightThrough(layer)
    before = layer.unpacked_codes().clone()
    grad = torch.randn(64, 16, generator=torch.Generator().manual_seed(2))
    frac = st.step(grad, code_lr=0.5, max_change=0.1, order=[0, 1])
    changed = (layer.unpacked_codes() != before).any(-1)
    assert 0 < changed.float().mean().item() == pytest.approx(frac) and frac <= 0.1 + 1e-9
    # the buffer moved against the gradient, by the relative step asked for
    moved = st.buffer - decode_weight(before, layer.codebooks, layer.scales)
    assert (moved * grad).sum() < 0
    assert moved.norm() / decode_weight(before, layer.codebooks, layer.scales).norm() == pytest.approx(0.5, rel=1e-3)
    assert st.step(torch.zeros(64, 16), code_lr=0.5, max_change=0.1, order=[0, 1]) == 0.0


def test_code_step_momentum_keeps_moving_along_the_averaged_gradient():
    """pv_code_beta1 > 0: a step whose own gradient is unrelated to the last one still moves the buffer along the
    last one (β₁ = 0 forgets it), and a bad momentum or decay name is refused in one line."""
    from aqlm_compile.errors import ConfigError
    from aqlm_compile.quantize.presets import get_preset

    g = torch.Generator().manual_seed(3)
    first, second = torch.randn(64, 16, generator=g), torch.randn(64, 16, generator=g)
    along = {}
    for beta1 in (0.0, 0.9):
        st = _StraightThrough(_layer(out=64, inp=16), beta1)
        st.step(first, code_lr=0.01, max_change=0.0, order=[0, 1])
        before = st.buffer.clone()
        st.step(second, code_lr=0.01, max_change=0.0, order=[0, 1])
        moved = st.buffer - before
        along[beta1] = float(-(moved * first).sum() / (moved.norm() * first.norm()))  # cosine with -first
    assert along[0.9] > 0.3 and abs(along[0.0]) < 0.2, along
    with pytest.raises(ConfigError, match=r"pv_code_beta1 1.0: expected a momentum in \[0, 1\)"):
        get_preset("pv", pv_code_beta1=1.0)
    with pytest.raises(ConfigError, match="pv_lr_decay 'cosine'"):
        get_preset("pv", pv_lr_decay="cosine")


@pytest.mark.parametrize("follow_p", [False, True])
def test_buffer_follows_p_keeps_only_the_code_steps_as_distance(follow_p):
    """pv_buffer_follows_p: a change of the scales (a P step) moves the buffer with the decoded weight, so the
    distance left is the V step's own move; without it that change is distance to the buffer too."""
    layer = _layer(out=64, inp=16)
    st = _StraightThrough(layer, follow_p=follow_p)
    with torch.no_grad():
        layer.scales.mul_(1.5)  # what a P step might do
    grad = torch.randn(64, 16, generator=torch.Generator().manual_seed(4))
    st.step(grad, code_lr=0.01, max_change=0.0, order=[0, 1])
    distance = float((st.buffer - layer.weight()).norm() / layer.weight().norm())
    if follow_p:
        assert distance == pytest.approx(0.01, rel=1e-3)
    else:
        assert distance > 0.3  # the buffer still sits at the old scales


@pytest.fixture(scope="module")
def coarse_ckpt(tiny_llama, tiny_corpus, tmp_path_factory):
    """A 1x4g8 tiny checkpoint: coarse enough that its KL to the FP model is far above noise (2x8g8's is ~1e-5)."""
    out = tmp_path_factory.mktemp("coarse") / "llama-1x4g8"
    quantize_job(str(tiny_llama), str(out), config="1x4g8", dataset=str(tiny_corpus), preset="tiny", device="cpu",
                 overrides={"kmeans_iters": 3, "max_rounds": 1})
    return out


@pytest.mark.parametrize("extra", [{}, {"pv_code_beta1": 0.9, "pv_lr_decay": "linear", "pv_buffer_follows_p": True,
                                    "pv_code_metric": "input"}],
                         ids=["reference", "momentum"])
def test_pv_from_checkpoint_changes_codes_and_keeps_the_best_state(extra, tiny_llama, coarse_ckpt, tiny_corpus,
                                                                   tmp_path):
    out = tmp_path / "pv"
    report = quantize_job(str(tiny_llama), str(out), dataset=str(tiny_corpus), preset="pv", device="cpu",
                          overrides={**PV_TINY, **extra}, from_checkpoint=str(coarse_ckpt))
    pv = report["pv_tuning"]
    assert pv["steps"] == 6 and pv["code_change_per_step"] > 0
    assert pv["code_beta1"] == extra.get("pv_code_beta1", 0.0)
    assert pv["lr_decay"] == extra.get("pv_lr_decay", "constant")
    kl = pv["val_kl"]
    assert len(kl) >= 2 and min(kl[1:]) < kl[0]  # lr 1e-3 on a tiny model: the KL to the teacher goes down
    assert report["blocks"] == [] and report["timings"]["pv"] > 0
    start, _, _ = fmt.load(coarse_ckpt)
    tuned, config, meta = fmt.load(out)
    assert config.name == "1x4g8" and meta["from_checkpoint"]["name"] == coarse_ckpt.name
    assert meta["method"]["settings"]["pv_steps"] == 6 and meta["preset"] == "pv"
    for name, value in extra.items():  # recorded when set; the defaults keep the old record
        assert meta["method"]["settings"][name] == value
    assert pv["buffer_follows_p"] == extra.get("pv_buffer_follows_p", False)
    assert pv["code_metric"] == extra.get("pv_code_metric", "l2")
    if not extra:
        assert not {"pv_code_beta1", "pv_lr_decay", "pv_buffer_follows_p", "pv_code_metric"} & \
            meta["method"]["settings"].keys()
    a, b = fmt.quantized_modules(start), fmt.quantized_modules(tuned)
    assert a.keys() == b.keys()
    changed = sum(int((a[n].codes != b[n].codes).any(-1).sum()) for n in a)
    total = sum(a[n].codes.shape[0] * a[n].codes.shape[1] for n in a)
    # the best state on validation is kept: codes changed, by at most 6 steps × 5% of the groups
    assert 0 < changed <= 0.3 * total + len(a)
    assert "/" not in meta["from_checkpoint"]["name"]


@pytest.mark.parametrize("args, message", [
    (["--head-config", "2x8g8"], "--head-config: not with --from-checkpoint"),
    (["--preset", "tiny"], "has no end-to-end stage"),
    (["--config", "1x8g8"], "--config 1x8g8: "),
])
def test_from_checkpoint_errors_are_one_line(args, message, tiny_llama, tiny_llama_ckpt, tmp_path):
    r = CliRunner().invoke(main, ["quantize", str(tiny_llama), "-o", str(tmp_path / "o"), "--preset", "pv",
                                  "--from-checkpoint", str(tiny_llama_ckpt), *args])
    assert r.exit_code != 0 and message in r.output, r.output
    assert "Traceback" not in r.output and r.output.strip().count("\n") == 0, r.output


def test_from_checkpoint_of_another_model_is_refused(tiny_qwen2, tiny_llama_ckpt, tmp_path):
    r = CliRunner().invoke(main, ["quantize", str(tiny_qwen2), "-o", str(tmp_path / "o"), "--preset", "pv",
                                  "--from-checkpoint", str(tiny_llama_ckpt)])
    assert r.exit_code != 0 and "not a checkpoint of" in r.output, r.output
    r = CliRunner().invoke(main, ["quantize", str(tiny_qwen2), "-o", str(tmp_path / "o"), "--preset", "pv",
                                  "--from-checkpoint", str(tmp_path)])
    assert r.exit_code != 0 and "not an AQLM checkpoint" in r.output, r.output
