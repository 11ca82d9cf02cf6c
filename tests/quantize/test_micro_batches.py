"""`micro_batch_size` (issue 16 item 1): the windows of a fine-tuning batch (block, global, PV) go through forward
and backward that many at a time with the gradients accumulated — the same steps, to float rounding, with one
micro-batch's activations in memory instead of the whole batch's."""

import json

import pytest
import torch

from aqlm_compile.errors import ConfigError
from aqlm_compile.jobs import quantize_job
from aqlm_compile.quantize.block import BlockRunner, finetune_block
from aqlm_compile.quantize.presets import QuantizeSettings


def _finetune(micro, seen=None):
    torch.manual_seed(0)
    block = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 8))
    inputs, targets = torch.randn(20, 3, 8), torch.randn(20, 3, 8)
    settings = QuantizeSettings(finetune_epochs=2, finetune_batch_size=4, finetune_early_stop=5,
                                micro_batch_size=micro)

    class Recording(BlockRunner):
        def __call__(self, b, hidden):
            if seen is not None:
                seen.append(hidden.shape[0])
            return super().__call__(b, hidden)

    report = finetune_block(block, Recording({}), inputs, targets, torch.arange(16), torch.arange(16, 20), settings,
                            torch.Generator().manual_seed(0))
    return block, report


def test_block_finetuning_by_micro_batches_takes_the_same_steps():
    whole, whole_report = _finetune(None)
    seen = []
    micro, micro_report = _finetune(1, seen)
    assert set(seen) == {1}  # never more than one window through the block at once
    for a, b in zip(whole.parameters(), micro.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
    assert micro_report["val_mse"] == pytest.approx(whole_report["val_mse"], rel=1e-5)
    assert _finetune(3)[1]["val_mse"] == pytest.approx(whole_report["val_mse"], rel=1e-5)  # 4 = 3 + 1


def test_micro_batch_size_below_one_is_a_config_error():
    with pytest.raises(ConfigError, match="micro_batch_size"):
        QuantizeSettings(micro_batch_size=0).checked()
    assert "micro_batch_size" not in QuantizeSettings().to_dict()  # unset: earlier runs' records and fingerprints


def test_a_run_by_micro_batches_writes_the_whole_batch_checkpoint_to_rounding(tiny_llama, tiny_corpus, tmp_path,
                                                                             monkeypatch):
    """Block fine-tuning, global fine-tuning and PV-tuning of the tiny model, whole batches and one window at a
    time: codes equal in ≥ 99% of groups, floats within 1e-4 (the sharded runs' tolerance); the end-to-end stages
    never run more than one window through the model at once."""
    from tests.quantize.test_distributed import assert_within_sharding_tolerance

    common = dict(config="2x8g8", dataset=str(tiny_corpus), preset="tiny", device="cpu",
                  overrides={"kmeans_iters": 3, "max_rounds": 1, "finetune_batch_size": 4, "global_epochs": 1.0,
                             "pv_steps": 2})
    quantize_job(str(tiny_llama), str(tmp_path / "whole"), assignments=["global_batch_size=4", "pv_batch_size=4"],
                 **common)
    from aqlm_compile.quantize import global_ft

    widths = []
    original = global_ft.KlObjective._summed

    def summed(self, local):
        widths.append(len(local))
        return original(self, local)

    monkeypatch.setattr(global_ft.KlObjective, "_summed", summed)
    quantize_job(str(tiny_llama), str(tmp_path / "micro"), assignments=[
        "global_batch_size=4", "pv_batch_size=4", "micro_batch_size=1"], **common)
    assert widths and set(widths) == {1}
    assert_within_sharding_tolerance(tmp_path / "whole", tmp_path / "micro")
    settings = json.loads((tmp_path / "micro" / "config.json").read_text())["aqlm_compile"]["method"]["settings"]
    assert settings["micro_batch_size"] == 1
