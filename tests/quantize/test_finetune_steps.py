"""`finetune_max_steps` caps the optimizer steps of each block fine-tuning epoch (the 7B-shaped memory benchmark
uses it to run one fine-tuning batch's working set without a whole epoch)."""

import pytest
import torch

from aqlm_compile.errors import ConfigError
from aqlm_compile.quantize.block import BlockRunner, finetune_block
from aqlm_compile.quantize.presets import QuantizeSettings


def _count_steps(max_steps):
    torch.manual_seed(0)
    block = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 8))
    inputs, targets = torch.randn(20, 3, 8), torch.randn(20, 3, 8)
    steps = []
    settings = QuantizeSettings(finetune_epochs=2, finetune_batch_size=4, finetune_early_stop=5,
                                finetune_max_steps=max_steps)
    out = finetune_block(block, BlockRunner({}), inputs, targets, torch.arange(16), torch.arange(16, 20), settings,
                         torch.Generator().manual_seed(0), on_step=lambda: steps.append(1))
    assert out["epochs"] == 2
    return len(steps)


def test_max_steps_caps_each_epoch():
    assert _count_steps(None) == 2 * 4  # 16 training windows in batches of 4, two epochs
    assert _count_steps(3) == 2 * 3
    assert _count_steps(100) == 2 * 4


def test_max_steps_below_one_is_a_config_error():
    with pytest.raises(ConfigError, match="finetune_max_steps"):
        QuantizeSettings(finetune_max_steps=0).checked()
