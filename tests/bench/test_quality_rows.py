"""Scoreboard quality rows (bench/quality.py): every row also scored on an unseen corpus, and a checkpoint counted
by the weights its artifact stores (`bench --report --checkpoint CKPT:EMBEDDING`)."""

import pytest

from aqlm_compile import format as fmt
from aqlm_compile.bench import quality as q
from aqlm_compile.evaluate import weight_bits


@pytest.fixture(scope="module")
def windows(tiny_llama, tiny_corpus):
    return q.Windows(tiny_llama, str(tiny_corpus), 16, 3), q.Windows(tiny_llama, "shakespeare", 16, 2)


def test_rows_carry_the_unseen_corpus(windows, tiny_llama):
    win, ood = windows
    row = q.fp_row(win, tiny_llama, ood)
    assert row["ppl"] > 1 and row["ppl_ood"] > 1 and row["ppl_ood"] != row["ppl"]
    assert "ppl_ood" not in q.fp_row(win, tiny_llama)  # no second corpus asked, none scored


def test_checkpoint_row_counts_its_artifact_weights(windows, tiny_llama_ckpt):
    win, ood = windows
    as_file = q.aqlm_row(win, tiny_llama_ckpt, "tiny", None, ood)
    assert as_file["file_bytes"] == (tiny_llama_ckpt / fmt.WEIGHTS).stat().st_size
    row = q.aqlm_row(win, tiny_llama_ckpt, "tiny", None, ood, embedding="int8")
    model, _, _ = fmt.load(tiny_llama_ckpt)
    assert row["file_bytes"] == weight_bits(model, "int8") // 8
    # tied to an fp16 head, int8 rows add their table (and row scales) to the fp16 one the head keeps
    v, h = model.get_input_embeddings().weight.shape
    assert weight_bits(model, "int8") - weight_bits(model, "stored") == 8 * v * h + 32 * v
    assert row["embedding"] == "int8" and "embedding int8" in row["bytes_kind"]
    assert row["ppl"] != as_file["ppl"] and row["ppl_ood"] > 1  # scored with the int8 rows, not the fp16 ones


def test_checkpoint_row_with_an_int8_head(windows, tiny_llama_ckpt):
    """`--checkpoint CKPT:stored:int8`: the tied table is stored once, as int8 rows + an fp32 scale per row (what
    `build --head int8` stores), and the row is scored with those rows."""
    win, ood = windows
    fp16 = q.aqlm_row(win, tiny_llama_ckpt, "tiny", None, ood, embedding="stored")
    int8 = q.aqlm_row(win, tiny_llama_ckpt, "tiny", None, ood, embedding="stored", head="int8")
    model, _, _ = fmt.load(tiny_llama_ckpt)
    v, h = model.get_input_embeddings().weight.shape
    assert fp16["file_bytes"] - int8["file_bytes"] == (16 * v * h - 8 * v * h - 32 * v) // 8
    assert int8["head"] == "int8" and "head int8" in int8["bytes_kind"] and "(head int8)" in int8["name"]
    assert int8["ppl"] != fp16["ppl"] and abs(int8["ppl"] / fp16["ppl"] - 1) < 0.05
    # a compact embedding beside an int8 head: both tables, each in its form
    both = q.aqlm_row(win, tiny_llama_ckpt, "tiny", None, ood, embedding="int4", head="int8")
    assert weight_bits(model, "int4", "int8") - weight_bits(model, "int4", "fp16") == -(8 * v * h - 32 * v)
    assert both["file_bytes"] == weight_bits(model, "int4", "int8") // 8
    from aqlm_compile.bench import records

    for row in (fp16, int8, both):  # report.json refuses any field its schema does not declare
        assert set(row) <= records.QUALITY_ROW, set(row) - records.QUALITY_ROW


@pytest.mark.parametrize("spec, message", [(":stored:int4", "head 'int4': expected one of fp16, int8"),
                                           (":int3", "embedding 'int3': expected one of")])
def test_checkpoint_spec_errors_are_one_line(spec, message, tiny_llama_ckpt):
    from click.testing import CliRunner

    from aqlm_compile.cli import main

    r = CliRunner().invoke(main, ["bench", "--report", "--sections", "quality", "--checkpoint",
                                  f"{tiny_llama_ckpt}{spec}"])
    assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output, r.output
