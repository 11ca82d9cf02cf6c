import json

import pytest
from click.testing import CliRunner

pytest.importorskip("tvm")

from aqlm_compile.cli import main  # noqa: E402


def test_bench_kernels_json_and_markdown(tmp_path):
    md = tmp_path / "k.md"
    r = CliRunner().invoke(main, ["bench", "--kernels", "--shapes", "64x128", "--configs", "2x8g8", "--batch", "1,9",
                                  "--rounds", "1", "--json", "--markdown", str(md)])
    assert r.exit_code == 0, r.output
    records = json.loads(r.output.strip().splitlines()[-1])
    assert [rec["kernel"] for rec in records] == ["gemv_direct", "gemm_decode"]
    for rec in records:
        for key in ("config", "out_features", "in_features", "batch", "target", "ms", "baseline", "baseline_ms", "speedup",
                    "ms_cold", "bandwidth_bound_ms"):
            assert key in rec
        assert rec["speedup"] == pytest.approx(rec["baseline_ms"] / rec["ms"])
    assert "gemv_lut" in records[0]["alternatives_ms"]  # the registry's choice is shown against the other kernel
    assert records[0]["aqlm_package_rel_diff"] < 1e-5  # same numbers as the aqlm package's kernel
    table = md.read_text().splitlines()
    assert len(table) == 2 + len(records) and "| 2x8g8 | 64×128 | 9 | gemm_decode |" in table[3]


@pytest.mark.parametrize("args,message", [(["--shapes", "64by128"], "expected OUTxIN"),
                                          (["--shapes", "64x100", "--configs", "2x8g8"], "not divisible"),
                                          (["--batch", "one"], "expected comma-separated"),
                                          (["--batch", "0"], "must be ≥ 1"),
                                          (["--configs", "2x8"], "2x8")])
def test_bench_rejects_bad_input(args, message):
    r = CliRunner().invoke(main, ["bench", "--kernels", *args])
    assert r.exit_code == 2 and message in r.output, r.output


def test_report_refuses_a_decode_sample_of_no_tokens(tmp_path):
    r = CliRunner().invoke(main, ["bench", "--report", "--quick", "--decode-tokens", "0", "--out", str(tmp_path)])
    assert r.exit_code == 2 and "--decode-tokens 0: expected ≥ 1" in r.output, r.output
    assert not any(tmp_path.iterdir())  # refused before anything was measured or written
