"""Activations on disk (issue 16, quantize/activations.py, `quantize --offload disk`): the buffer reads and writes
like the tensor it replaces, is a safetensors file, and a run with it writes the in-memory run's checkpoint bit for
bit — with the teacher for global fine-tuning on disk too, resumed, and with two processes."""

import hashlib

import pytest
import torch
from safetensors.torch import load_file

from aqlm_compile.jobs import quantize_job
from aqlm_compile.quantize.activations import DiskActivations, empty_like, relative_mse, release

TINY = dict(config="2x8g8", preset="tiny", device="cpu")


def test_disk_activations_read_and_write_like_a_tensor(tmp_path):
    ref = torch.randn(7, 5, 3)
    disk = DiskActivations(tmp_path / "a.safetensors", (7, 5, 3))
    disk[0:4] = ref[0:4]
    disk[4:7] = ref[4:7]
    assert disk.shape == ref.shape and len(disk) == 7
    assert torch.equal(disk[2:6], ref[2:6]) and torch.equal(disk[3], ref[3]) and torch.equal(disk[-1], ref[-1])
    idx = torch.tensor([6, 0, 1, 2, 5])  # runs of consecutive windows are read together, order kept
    assert torch.equal(disk[idx], ref[idx]) and torch.equal(disk[[4]], ref[[4]])
    assert torch.equal(disk[::2], ref[::2])
    disk.flush()
    assert torch.equal(load_file(str(tmp_path / "a.safetensors"))["hidden"], ref)  # a plain safetensors file
    again = DiskActivations(tmp_path / "a.safetensors")
    assert torch.equal(again[0:7], ref) and not again.owned
    with pytest.raises(ValueError, match=r"\(2, 5, 3\) into windows 0:3"):
        disk[0:3] = ref[0:2]
    with pytest.raises(TypeError):
        disk[1] = ref[1]
    half = DiskActivations(tmp_path / "h.safetensors", (2, 3), torch.float16)
    half[0:2] = ref[0, :2, :]
    assert half.dtype == torch.float16 and torch.equal(half[0:2], ref[0, :2, :].half())
    out = empty_like(disk)
    assert isinstance(out, DiskActivations) and out.path.parent == tmp_path and out.path != disk.path
    assert relative_mse(disk, disk, 3) == 0.0
    release(out)
    assert not out.path.exists()
    release(again)  # a file the work folder names is closed, not removed
    assert (tmp_path / "a.safetensors").exists()


def _digest(path):
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


@pytest.mark.parametrize("overrides", [{"kmeans_iters": 3, "max_rounds": 1},
                                       {"kmeans_iters": 3, "max_rounds": 1, "global_epochs": 1.0}],
                         ids=["blocks", "with-teacher"])
def test_offload_disk_writes_the_in_memory_checkpoint(tiny_llama, tiny_corpus, tmp_path, overrides):
    memory, disk = tmp_path / "memory", tmp_path / "disk"
    quantize_job(str(tiny_llama), str(memory), dataset=str(tiny_corpus), overrides=overrides, offload="none", **TINY)
    quantize_job(str(tiny_llama), str(disk), dataset=str(tiny_corpus), overrides=overrides, offload="disk", **TINY)
    assert _digest(memory) == _digest(disk)
    assert not (tmp_path / ".disk.spill").exists() and not (tmp_path / ".disk.work").exists()


def test_offload_disk_resumes(tiny_llama, tiny_corpus, tmp_path):
    overrides = {"kmeans_iters": 3, "max_rounds": 1}
    full, part = tmp_path / "full", tmp_path / "part"
    quantize_job(str(tiny_llama), str(full), dataset=str(tiny_corpus), overrides=overrides, offload="none", **TINY)
    with pytest.raises(KeyboardInterrupt):
        quantize_job(str(tiny_llama), str(part), dataset=str(tiny_corpus), overrides=overrides, offload="disk",
                     stop_after_block=0, **TINY)
    resume_file = tmp_path / ".part.work" / "activations-1.safetensors"
    assert load_file(str(resume_file))["hidden"].shape[0] > 0  # the block's outputs, renamed into place
    quantize_job(str(tiny_llama), str(part), dataset=str(tiny_corpus), overrides=overrides, offload="disk",
                 resume=True, **TINY)
    assert _digest(part) == _digest(full)


def test_offload_is_checked(tiny_llama, tiny_corpus, tmp_path):
    from aqlm_compile.errors import ModelError

    with pytest.raises(ModelError, match="--offload 'ram': expected one of auto, none, disk"):
        quantize_job(str(tiny_llama), str(tmp_path / "q"), dataset=str(tiny_corpus), offload="ram", **TINY)
