"""kill -9 of a real quantizer process at seeded points of a 6-block run, then --resume: the checkpoint equals the
uninterrupted run's tensor for tensor (issue 15). A point is "right after the N-th file write" of the process
(tests/quantize/kill_at_write.py), so kills land between the files of one save as well as between blocks. CI runs
a few points; the slow test runs the 20 of the acceptance."""

import hashlib
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from aqlm_compile.jobs import work_folder_for

HERE = Path(__file__).parent
RUN = ["--config", "2x4g8", "--preset", "tiny", "--seed", "5", "--device", "cpu", "--quiet"]


def digest(path):
    return hashlib.sha256((Path(path) / "model.safetensors").read_bytes()).hexdigest()


def quantize_process(model, out, corpus, kill_at: int, *extra):
    env = {**os.environ, "KILL_AT_WRITE": str(kill_at), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE)}
    return subprocess.run([sys.executable, str(HERE / "kill_at_write.py"), "quantize", str(model), "-o", str(out),
                           "--dataset", str(corpus), *RUN, *extra], env=env, capture_output=True, text=True,
                          timeout=900)


@pytest.fixture(scope="module")
def six_blocks(tmp_path_factory):
    """A 6-block tiny Llama, its corpus, the uninterrupted checkpoint (run by the same helper, never killed) and
    that run's number of file writes."""
    from tiny_models import make_model, write_corpus

    root = tmp_path_factory.mktemp("six")
    model = make_model(root / "six", "llama", num_hidden_layers=6)
    corpus = write_corpus(root / "corpus.txt")
    full = root / "full"
    r = quantize_process(model, full, corpus, 10 ** 9)
    assert r.returncode == 0, r.stderr[-3000:]
    writes = int(re.search(r"kill_at_write: (\d+) writes", r.stderr).group(1))
    assert writes >= 6 * 4  # at least the block file, activations and progress of each block
    return model, corpus, digest(full), full, writes


def kill_and_resume(six_blocks, point: int, tmp_path):
    model, corpus, reference, full, writes = six_blocks
    point = max(1, math.ceil(point * writes))  # a fraction of the run's writes → the write to kill after
    out = tmp_path / f"killed-{point}"
    r = quantize_process(model, out, corpus, point)
    assert r.returncode == -9, r.stderr[-3000:]
    if (out / "model.safetensors").is_file() and not work_folder_for(out).exists():
        assert digest(out) == reference  # killed after the checkpoint was renamed into place
        return "complete"
    assert not out.exists() or not (out / "config.json").is_file() or work_folder_for(out).exists()
    r = quantize_process(model, out, corpus, 10 ** 9, "--resume")  # same process settings as the reference
    assert r.returncode == 0, r.stderr[-3000:]
    got, want = load_file(str(out / "model.safetensors")), load_file(str(full / "model.safetensors"))
    assert sorted(got) == sorted(want)
    for name in want:  # tensor for tensor
        assert got[name].dtype == want[name].dtype and bool((got[name] == want[name]).all()), name
    assert digest(out) == reference
    return "resumed"


def seeded_points(n: int, seed: int = 15) -> list[float]:
    """n seeded points of a run, as fractions of its writes (0, 1]."""
    return sorted(float(f) for f in np.random.default_rng(seed).uniform(0.0, 1.0, n))


@pytest.mark.parametrize("point", seeded_points(3, seed=1))
def test_kill_9_then_resume_equals_the_uninterrupted_run(point, six_blocks, tmp_path):
    assert kill_and_resume(six_blocks, point, tmp_path) in ("resumed", "complete")


@pytest.mark.slow
def test_kill_9_at_20_seeded_points(six_blocks, tmp_path):
    outcomes = [kill_and_resume(six_blocks, p, tmp_path) for p in seeded_points(20)]
    assert outcomes.count("resumed") + outcomes.count("complete") == 20, outcomes
