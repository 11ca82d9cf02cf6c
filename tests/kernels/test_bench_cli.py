import json

import pytest
from click.testing import CliRunner

pytest.importorskip("tvm")

from aqlm_compile.cli import main  # noqa: E402


def test_bench_kernels_json_records():
    r = CliRunner().invoke(main, ["bench", "--kernels", "--shapes", "64x128", "--configs", "2x8g8", "--batch", "1,2",
                                  "--rounds", "1", "--json"])
    assert r.exit_code == 0, r.output
    records = json.loads(r.output.strip().splitlines()[-1])
    assert len(records) == 2
    for rec in records:
        for key in ("config", "out_features", "in_features", "batch", "target", "ms", "baseline", "baseline_ms", "speedup"):
            assert key in rec
        assert rec["speedup"] == pytest.approx(rec["baseline_ms"] / rec["ms"])


def test_bench_rejects_bad_shape():
    r = CliRunner().invoke(main, ["bench", "--kernels", "--shapes", "64by128"])
    assert r.exit_code == 2 and "expected OUTxIN" in r.output
