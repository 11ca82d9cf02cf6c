"""A CI-sized fuzz run (issue 15; the full run is `python benchmarks/fuzz.py`): corrupted copies of the tiny
checkpoint and of its x86 artifact, and malformed inputs to the artifact's ORT op library, each in a worker process
the harness restarts after a crash. Every case must end in a clean one-line error or be accepted."""

import json

from aqlm_compile.bench.fuzz import run_case, run_fuzz

COUNTS = {"checkpoint": 40, "artifact": 30, "op": 30}


def test_fuzz_subset_has_no_crash_hang_or_traceback(tiny_llama_ckpt, llama_art):
    result = run_fuzz({"checkpoint": tiny_llama_ckpt, "artifact": llama_art}, COUNTS, seed=1)
    assert result["failures"] == [], json.dumps(result["failures"][:3], indent=1)
    for family, n in COUNTS.items():
        t = result["totals"][family]
        assert t["tried"] == n and t["accepted"] + t["clean"] == n
        assert t["clean"] >= n // 3, t  # the mutations do break things (not a run of no-ops)


def test_a_case_is_reproduced_by_its_id(tiny_llama_ckpt, llama_art):
    seeds = {"checkpoint": str(tiny_llama_ckpt), "artifact": str(llama_art)}
    for family in ("checkpoint", "artifact", "op"):
        assert run_case(family, 3, 7, seeds) == run_case(family, 3, 7, seeds)


def test_the_harness_reports_a_crash_and_carries_on(tiny_llama_ckpt, llama_art, monkeypatch):
    """A worker killed by a signal is a `crash` (not a pass), and the next case runs in a fresh worker."""
    import aqlm_compile.bench.fuzz as fuzz

    real = fuzz._Worker.run

    def run(self, case, timeout):
        if case["index"] == 1:
            self.proc.kill()  # as a segfault in a case would
            self.proc.wait()
        return real(self, case, timeout)

    monkeypatch.setattr(fuzz._Worker, "run", run)
    result = run_fuzz({"checkpoint": tiny_llama_ckpt, "artifact": llama_art}, {"op": 3}, seed=0)
    assert result["totals"]["op"]["crash"] == 1 and result["totals"]["op"]["tried"] == 3
    assert [f["index"] for f in result["failures"]] == [1]
