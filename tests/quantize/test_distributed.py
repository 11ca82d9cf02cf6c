"""Quantizing with several processes (issue 16, quantize/distributed.py): `quantize --nproc 2` (gloo, this machine)
writes the checkpoint one process writes, bit for bit, at the same threads per process; it resumes a one-process
run's work folder; a bad input is one line from the parent, not one per rank, and no traceback."""

import hashlib
import json
import os
import subprocess
import sys

import pytest

from aqlm_compile.quantize.distributed import SINGLE, Ranks

TINY = ["--preset", "tiny", "--config", "2x8g8", "--set", "kmeans_iters=3", "--set", "max_rounds=1", "--device",
        "cpu", "--quiet"]


def _run(args, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the one-process reference at one thread, as each rank runs
    return subprocess.run([sys.executable, "-m", "aqlm_compile", *args], capture_output=True, text=True, env=env,
                          timeout=600, **kw)


def _digest(path):
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


def test_ranks_deal_out_linears_and_one_process_needs_no_group():
    assert [Ranks(0, 3).owner(i) for i in range(7)] == [0, 1, 2, 0, 1, 2, 0]
    assert SINGLE.is_main and SINGLE.world == 1 and SINGLE.broadcast_int(5) == 5
    assert SINGLE.broadcast_floats([1.5], src=0) == [1.5]


@pytest.fixture(scope="module")
def one_process(tiny_llama, tiny_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("dist") / "one"
    r = _run(["quantize", str(tiny_llama), "-o", str(out), "--dataset", str(tiny_corpus), *TINY])
    assert r.returncode == 0, r.stderr[-2000:]
    return out


@pytest.mark.parametrize("offload", ["none", "disk"])
def test_two_processes_write_the_one_process_checkpoint(one_process, tiny_llama, tiny_corpus, tmp_path, offload):
    out = tmp_path / "two"
    r = _run(["quantize", str(tiny_llama), "-o", str(out), "--dataset", str(tiny_corpus), *TINY, "--nproc", "2",
              "--offload", offload])
    assert r.returncode == 0, r.stderr[-2000:]
    assert _digest(out) == _digest(one_process)
    meta = json.loads((out / "config.json").read_text())["aqlm_compile"]
    assert meta["processes"] == 2 and "processes" not in json.loads((one_process / "config.json").read_text())[
        "aqlm_compile"]
    # every layer's report came from the rank that quantized it
    two = json.loads((out / "quantize_report.json").read_text())["blocks"]
    one = json.loads((one_process / "quantize_report.json").read_text())["blocks"]
    assert [{n: (l["relative_error"], l["rounds"]) for n, l in b["layers"].items()} for b in two] == \
        [{n: (l["relative_error"], l["rounds"]) for n, l in b["layers"].items()} for b in one]
    assert not any(p.name.startswith((".two.work", ".two.spill")) for p in tmp_path.iterdir())


def test_two_processes_resume_a_one_process_run(one_process, tiny_llama, tiny_corpus, tmp_path):
    out = tmp_path / "part"
    stop = ("from aqlm_compile.jobs import quantize_job\n"
            f"quantize_job({str(tiny_llama)!r}, {str(out)!r}, config='2x8g8', dataset={str(tiny_corpus)!r}, "
            "preset='tiny', device='cpu', overrides={'kmeans_iters': 3, 'max_rounds': 1}, stop_after_block=0)")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", stop], capture_output=True, text=True, env=env, timeout=600)
    assert "KeyboardInterrupt" in r.stderr and not (out / "model.safetensors").exists()
    loud = [a for a in TINY if a != "--quiet"]
    r = _run(["quantize", str(tiny_llama), "-o", str(out), "--dataset", str(tiny_corpus), *loud, "--nproc", "2",
              "--resume"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming at block 1 of 2" in r.stderr  # rank 0's log: block 0 came from the work folder
    assert _digest(out) == _digest(one_process)


def test_a_bad_input_is_one_line_from_the_parent(tiny_llama, tiny_corpus, tmp_path):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    r = _run(["quantize", str(tiny_llama), "-o", str(taken), "--dataset", str(tiny_corpus), *TINY, "--nproc", "2"])
    assert r.returncode == 2, r.stderr[-2000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: ModelError: {taken}: exists and is not an AQLM checkpoint; refusing to overwrite it"]
    assert "Traceback" not in r.stderr and (taken / "notes.txt").read_text() == "mine"


@pytest.mark.slow
def test_two_processes_on_a_smollm2_prefix(tmp_path):
    """SmolLM2-135M, its first 4 blocks, fast preset: 2 processes and 1 write the same checkpoint (≈ 10 min)."""
    args = ["--preset", "fast", "--num-blocks", "4", "--device", "cpu", "--quiet"]
    one, two = tmp_path / "one", tmp_path / "two"
    r = _run(["quantize", "-o", str(one), *args])
    assert r.returncode == 0, r.stderr[-2000:]
    r = _run(["quantize", "-o", str(two), *args, "--nproc", "2"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert _digest(one) == _digest(two)


def test_a_work_folder_rank_0_refuses_stops_every_rank_with_its_message(tiny_llama, tiny_corpus, tmp_path):
    """--resume onto another run's work folder: rank 0's FormatError, once, from whichever rank the launcher
    reports (every rank raises rank 0's message)."""
    out = tmp_path / "part"
    stop = ("from aqlm_compile.jobs import quantize_job\n"
            f"quantize_job({str(tiny_llama)!r}, {str(out)!r}, config='2x8g8', dataset={str(tiny_corpus)!r}, "
            "preset='tiny', device='cpu', overrides={'kmeans_iters': 3, 'max_rounds': 1}, stop_after_block=0)")
    subprocess.run([sys.executable, "-c", stop], capture_output=True, text=True, timeout=600)
    r = _run(["quantize", str(tiny_llama), "-o", str(out), "--dataset", str(tiny_corpus), *TINY, "--nproc", "2",
              "--resume", "--seed", "1"])
    assert r.returncode == 2, r.stderr[-2000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "was written by a run with different settings (seed)" in errors[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr
