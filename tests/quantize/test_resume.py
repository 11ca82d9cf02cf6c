"""An interrupted run resumed with --resume ends bit-identical to an uninterrupted one; same seed, same bytes."""

import hashlib
import json

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


class _Killed(BaseException):
    """Stands for a kill -9 at one point of a save (BaseException: nothing in the job catches it)."""


KILL_RUN = dict(config="2x4g8", preset="tiny", device="cpu", seed=3)


@pytest.fixture(scope="module")
def uninterrupted(tiny_llama, tiny_corpus, tmp_path_factory):
    full = tmp_path_factory.mktemp("uninterrupted") / "full"
    quantize_job(str(tiny_llama), str(full), dataset=str(tiny_corpus), **KILL_RUN)
    return digest(full)


@pytest.mark.parametrize("point", ["after the block file", "after the activations file",
                                   "after progress.json"])
def test_a_kill_inside_one_save_resumes_to_the_same_checkpoint(point, uninterrupted, tiny_llama, tiny_corpus,
                                                                tmp_path, monkeypatch):
    """Killed between the files of block 1's save (block 0 already committed): resume redoes exactly what the last
    progress.json did not commit and ends bit-identical to an uninterrupted run."""
    from aqlm_compile import format as fmt

    common = dict(dataset=str(tiny_corpus), **KILL_RUN)

    calls = {"save_file": 0, "progress": 0}
    real_save, real_write = fmt.save_file, fmt.atomic_write_bytes

    def save_file(tensors, path, *a, **k):
        real_save(tensors, path, *a, **k)
        if ".work" in str(path):
            calls["save_file"] += 1  # block 0: calls 1 and 2; block 1: 3 (block file) and 4 (activations)
            if (point, calls["save_file"]) in (("after the block file", 3), ("after the activations file", 4)):
                raise _Killed

    def write(path, data):
        real_write(path, data)
        if str(path).endswith("progress.json"):
            calls["progress"] += 1  # 1: start, 2: block 0 committed, 3: block 1 committed
            if point == "after progress.json" and calls["progress"] == 3:
                raise _Killed

    monkeypatch.setattr(fmt, "save_file", save_file)
    monkeypatch.setattr(fmt, "atomic_write_bytes", write)
    part = tmp_path / "part"
    with pytest.raises(_Killed):
        quantize_job(str(tiny_llama), str(part), **common)
    monkeypatch.undo()
    work = work_folder_for(part)
    committed = 2 if point == "after progress.json" else 1
    assert json.loads((work / "progress.json").read_text())["next_block"] == committed
    report = quantize_job(str(tiny_llama), str(part), resume=True, **common)
    assert [b["block"] for b in report["blocks"]] == [0, 1]
    assert digest(part) == uninterrupted
