"""The scoreboard: `bench --report --quick` end to end on a tiny model (the real command CI can afford), the
schema of what it writes, and the rule that no result file holds a field its script does not write."""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

pytest.importorskip("tvm")

from aqlm_compile.bench import records  # noqa: E402
from aqlm_compile.cli import main  # noqa: E402

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


def test_every_result_file_has_a_writer_and_only_its_fields():
    files = sorted(RESULTS.rglob("*.json"))
    assert files, "benchmarks/results holds no JSON"
    for path in files:
        rel = path.relative_to(RESULTS).as_posix()
        spec = records.writer_of(rel)
        assert spec is not None, f"{rel}: no script writes this file (aqlm_compile/bench/records.py WRITERS)"
        _, top, record = spec
        data = json.loads(path.read_text())
        assert records.unknown_fields(data, top, record) == [], f"{rel}: fields its writer ({spec[0]}) does not write"


def test_a_hand_added_field_is_refused():
    with pytest.raises(ValueError, match="peak_rss_gb"):
        records.check_report({"schema_version": 1, "peak_rss_gb": 2.7})
    bad = {"schema_version": 1, "speed": {"rows": [{"engine": "x", "tokens_per_s_typed": 5}]}}
    assert records.unknown_fields(bad, records.REPORT, None) == ["speed.rows[0].tokens_per_s_typed"]


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    r = CliRunner().invoke(main, ["bench", "--report", "--quick", "--decode-tokens", "6", "--out", str(out)])
    assert r.exit_code == 0, r.output
    return out, json.loads((out / "report.json").read_text()), r.output


def test_quick_report_schema(quick_report):
    out, data, output = quick_report
    assert records.unknown_fields(data, records.REPORT, None) == []
    for key in ("schema_version", "machine", "quality", "speed", "kernels", "threads", "skipped", "wall_s", "date"):
        assert key in data, key
    assert data["machine"]["memory_bandwidth_gbs"] > 0 and data["machine"]["cores"] >= 1
    # quality: FP, our checkpoint, RTN — all on the same windows, with sizes
    fams = {r["family"] for r in data["quality"]["rows"]}
    assert {"fp", "aqlm-compile", "rtn"} <= fams
    assert data["quality"]["ood_protocol"]["dataset"].startswith("shakespeare")
    for r in data["quality"]["rows"]:
        assert r["ppl"] > 1 and r["file_bytes"] > 0 and r["bits_per_param_linears"] > 0
        assert r["ppl_ood"] > 1  # every row also on the corpus no preset calibrates on
    aqlm = next(r for r in data["quality"]["rows"] if r["family"] == "aqlm-compile")
    assert aqlm["quantize_wall_s"] > 0 and aqlm["quantize_peak_rss_bytes"] > 0
    # speed: every engine at all cores and at 1 thread, plus the busy-neighbour decode, each measured
    rows = data["speed"]["rows"]
    engines = {r["engine"] for r in rows}
    assert any("TVM runtime" in e and "aqlm-compile" in e for e in engines)
    assert any("ONNX Runtime + op library" in e for e in engines)
    assert any(e.startswith("dense FP16") for e in engines)
    # `build`'s default artifact stores the tied head as int8 rows (both routes); the second, TVM-only artifact
    # keeps it fp16 (`build --head fp16`)
    assert {"aqlm-compile 2x8g8 + int8 head, TVM runtime", "aqlm-compile 2x8g8 + int8 head, ONNX Runtime + op library",
            "aqlm-compile 2x8g8, TVM runtime"} <= engines, engines
    int8 = next(r for r in rows if r["engine"] == "aqlm-compile 2x8g8 + int8 head, TVM runtime")
    plain = next(r for r in rows if r["engine"] == "aqlm-compile 2x8g8, TVM runtime")
    assert plain["artifact"] != int8.get("artifact") and int8["file_bytes"] < plain["file_bytes"]
    for r in rows:
        assert "error" not in r, r
        assert r["decode_tokens_per_s"] > 0 and r["peak_rss_bytes"] > 0 and r["file_bytes"] > 0
        assert r["decode_tokens"] == 6  # --decode-tokens, every engine alike
        if r["condition"] == "idle":
            assert set(r["prefill_tokens_per_s"]) == {str(p) for p in r["prompt_lengths"]}
    conds = {(r["engine"], r["threads"], r["condition"] != "idle") for r in rows}
    threads = {data["threads"], 1}
    for e in engines:
        assert {(e, t, False) for t in threads} | {(e, data["threads"], True)} <= conds
    # peak RSS is each engine's own (not the parent's high-water mark carried across exec)
    assert len({r["peak_rss_bytes"] for r in rows}) > 1
    # kernels: ours vs torch fp32 and bf16 at the same thread count
    k = data["kernels"]["records"][0]
    assert k["ms"] > 0 and k["baseline_ms"] > 0 and k["bf16_ms"] > 0
    # llama.cpp: measured when its tools are built, otherwise skipped with the reason printed
    if not any(r["family"] == "llama.cpp" for r in rows):
        assert "llama.cpp" in data["skipped"] and "llama.cpp" in output
    md = (out / "report.md").read_text()
    assert "## Speed" in md and "## Quality vs size" in md and "## Kernels" in md
    for png in ("quality_vs_bytes.png", "speed_decode.png", "speed_prefill.png", "kernels_vs_batch.png"):
        assert (out / png).stat().st_size > 1000, png
        assert f"`{png}`" in md
    # a run of some sections names only the plots it drew
    from aqlm_compile.bench.render import render_markdown

    quality_only = render_markdown({k: v for k, v in data.items() if k not in ("speed", "kernels")},
                                   ["quality_vs_bytes.png"])
    assert "`quality_vs_bytes.png`" in quality_only and "speed_decode.png" not in quality_only


def test_render_updates_the_readme_block_only(quick_report, tmp_path):
    out, data, _ = quick_report
    readme = tmp_path / "README.md"
    from aqlm_compile.bench.render import README_BEGIN, README_END

    readme.write_text(f"# title\n\nintro\n\n{README_BEGIN}\nold figures\n{README_END}\n\ntail\n")
    r = CliRunner().invoke(main, ["bench", "--render", str(out / "report.json"), "--readme", str(readme)])
    assert r.exit_code == 0, r.output
    text = readme.read_text()
    assert text.startswith("# title\n\nintro\n\n") and text.endswith("\n\ntail\n")
    assert "old figures" not in text and "report.json" in text
    engine = next(r for r in data["speed"]["rows"] if r["engine"].startswith("dense FP16") and r["condition"] == "idle"
                  and r["threads"] == data["threads"])
    assert f"{engine['decode_tokens_per_s']:.1f}" in text  # the figure comes from report.json


@pytest.mark.parametrize("args,message", [(["--report", "--kernels"], "exactly one"),
                                          (["--report", "--sections", "speed,typo"], "unknown ['typo']"),
                                          (["--report", "--quick", "--readme", "README.md"], "full report only"),
                                          (["--render", "/nonexistent/report.json"], "no such report.json"),
                                          (["--report", "--readme", "/nonexistent/README.md"], "generated results"),
                                          (["--report", "--synthetic-head-config", "4x8"], "expected MxBgG")])
def test_bench_report_rejects_bad_input(args, message):
    r = CliRunner().invoke(main, ["bench", *args])
    assert r.exit_code == 2 and message in r.output, r.output


def test_busy_neighbour_is_low_priority_and_stopped():
    import os

    from aqlm_compile.bench.proc import autogroup_nice, busy_neighbour

    with busy_neighbour() as pid:
        assert os.getpriority(os.PRIO_PROCESS, pid) == 19
        # under autogroup scheduling a loop in its own session is low priority only if its group is
        if autogroup_nice(pid) is not None:
            assert autogroup_nice(pid) == 19
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_the_aqlm_head_variant_streams_its_own_head_bytes(tiny_llama, tmp_path):
    """The 7B-shaped rows' AQLM-head engine (ReportOptions.synthetic_head_config): its bytes per token come from its
    own checkpoint (the head's codes, codebooks and scales), not from the subject's int8-head one."""
    from aqlm_compile.bench.report import Subject, _bytes_split
    from aqlm_compile.bench.synthetic import make_aqlm_checkpoint
    from aqlm_compile.config import AqlmConfig

    body = make_aqlm_checkpoint(tiny_llama, tmp_path / "body", "2x8g8")
    headed = make_aqlm_checkpoint(tiny_llama, tmp_path / "headed", "2x8g8", head_config="2x8g8")
    s = Subject("t", "tiny", tiny_llama, blocks=2, speed_ckpt=body)
    int8 = {"family": "aqlm-compile", "kind": "aqlm", "engine": "aqlm-compile 2x8g8 + int8 head, TVM runtime"}
    aqlm = {"family": "aqlm-compile", "kind": "aqlm", "engine": "aqlm-compile 2x8g8 + AQLM 2x8g8 head, TVM runtime",
            "checkpoint": str(headed)}
    blocks8, head8 = _bytes_split(s, int8)
    blocks2, head2 = _bytes_split(s, aqlm)
    cfg = json.loads((tiny_llama / "config.json").read_text())
    vocab, hidden = cfg["vocab_size"], cfg["hidden_size"]
    assert blocks8 == blocks2
    # int8 rows + an fp32 scale each; a tied table is stored once, as the embedding (the 7B shapes are untied)
    assert head8 == (0 if cfg.get("tie_word_embeddings") else vocab * (hidden + 4))
    codes = vocab * hidden // 8 * 2  # two 8-bit codes per group of 8 inputs
    assert codes < head2 <= AqlmConfig.parse("2x8g8").layer_bits(vocab, hidden) // 8 + 4 * vocab
