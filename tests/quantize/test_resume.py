"""An interrupted run resumed with --resume ends bit-identical to an uninterrupted one; same seed, same bytes."""

import hashlib

import pytest

from aqlm_compile.jobs import quantize_job, work_folder_for


def digest(path):
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


def test_resume_after_interruption_is_bit_identical(tiny_llama, tiny_corpus, tmp_path):
    common = dict(config="2x4g8", dataset=str(tiny_corpus), preset="tiny", device="cpu", seed=7)
    full = tmp_path / "full"
    quantize_job(str(tiny_llama), str(full), **common)

    again = tmp_path / "again"
    quantize_job(str(tiny_llama), str(again), **common)
    assert digest(again) == digest(full)  # --seed makes runs bit-identical

    part = tmp_path / "part"
    with pytest.raises(KeyboardInterrupt):
        quantize_job(str(tiny_llama), str(part), stop_after_block=0, **common)
    assert not part.exists()  # nothing half-written where the checkpoint goes
    work = work_folder_for(part)
    assert (work / "blocks" / "0.safetensors").exists() and not (work / "blocks" / "1.safetensors").exists()
    report = quantize_job(str(tiny_llama), str(part), resume=True, **common)
    assert [b["block"] for b in report["blocks"]] == [0, 1]
    assert digest(part) == digest(full)
    assert not work.exists()  # the work folder is removed once the checkpoint is written


def test_resume_refuses_other_settings(tiny_llama, tiny_corpus, tmp_path):
    from aqlm_compile.errors import FormatError

    out = tmp_path / "q"
    with pytest.raises(KeyboardInterrupt):
        quantize_job(str(tiny_llama), str(out), config="2x4g8", dataset=str(tiny_corpus), preset="tiny",
                     device="cpu", stop_after_block=0)
    with pytest.raises(FormatError, match="different settings .*config"):
        quantize_job(str(tiny_llama), str(out), config="1x4g8", dataset=str(tiny_corpus), preset="tiny",
                     device="cpu", resume=True)
