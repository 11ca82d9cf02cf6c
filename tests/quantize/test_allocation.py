"""Bit allocation (`quantize/allocation.py`): the planner `--bits` will use."""

import itertools
import random

import pytest
import torch

from aqlm_compile.quantize.allocation import Option, allocate, lower_hull, prefix_losses


def test_lower_hull_drops_dominated_and_concave_options():
    opts = [Option("a", 1, 10.0), Option("b", 2, 9.5), Option("c", 3, 4.0), Option("d", 4, 4.0), Option("e", 5, 3.0)]
    # b lies above the chord a–c (its drop per bit is smaller than c's); d buys nothing over c
    assert [o.name for o in lower_hull(opts)] == ["a", "c", "e"]
    assert [o.name for o in lower_hull(list(reversed(opts)))] == ["a", "c", "e"]


def test_allocate_equals_brute_force_on_convex_unit_steps():
    rng = random.Random(0)
    for trial in range(30):
        layers = {}
        for n in range(4):
            # convex decreasing losses at 1..4 "codebooks" of equal size: the greedy is exactly optimal here
            drops = sorted((rng.uniform(0.1, 5) for _ in range(3)), reverse=True)
            loss = rng.uniform(5, 20)
            opts = [Option("1", 100, loss)]
            for m, d in enumerate(drops, start=2):
                loss -= d
                opts.append(Option(str(m), 100 * m, loss))
            layers[f"l{n}"] = opts
        budget = rng.randint(400, 1600)
        got = allocate(layers, budget)
        assert sum(o.bits for o in got.values()) <= budget
        best = min((combo for combo in itertools.product(*layers.values()) if sum(o.bits for o in combo) <= budget),
                   key=lambda combo: sum(o.loss for o in combo))
        assert sum(o.loss for o in got.values()) == pytest.approx(sum(o.loss for o in best)), trial


def test_allocate_prefers_the_sensitive_layer_and_refuses_an_impossible_budget():
    layers = {"flat": [Option("1", 10, 1.0), Option("2", 20, 0.9)], "steep": [Option("1", 10, 9.0), Option("2", 20, 1.0)]}
    assert {k: o.name for k, o in allocate(layers, 30).items()} == {"flat": "1", "steep": "2"}
    assert {k: o.name for k, o in allocate(layers, 40).items()} == {"flat": "2", "steep": "2"}
    with pytest.raises(ValueError, match="smallest possible total, 20 bits"):
        allocate(layers, 19)


def test_prefix_losses_fall_with_each_codebook():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 64, generator=g)
    x = torch.randn(256, 64, generator=g)
    h = x.T @ x / 256
    losses = prefix_losses(w, h, 3, 16, 8, torch.Generator().manual_seed(1), iters=5, max_points=None)
    assert len(losses) == 3 and losses[0] > losses[1] > losses[2] > 0
    assert losses[0] < float(((w @ h) * w).sum())  # one codebook already beats nothing
