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


def _finetune_in(dtype, runner_dtypes=None):
    torch.manual_seed(0)
    block = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 16))
    inputs = torch.randn(20, 3, 16)
    targets = torch.tanh(inputs @ torch.randn(16, 16) * 0.5)  # learnable: the MSE must fall

    class Recording(BlockRunner):
        def __call__(self, b, hidden):
            out = super().__call__(b, hidden)
            if runner_dtypes is not None:
                runner_dtypes.add(out.dtype)
            return out

    settings = QuantizeSettings(finetune_epochs=3, finetune_batch_size=4, finetune_early_stop=5, finetune_lr=1e-2,
                                finetune_dtype=dtype)
    report = finetune_block(block, Recording({}), inputs, targets, torch.arange(16), torch.arange(16, 20), settings,
                            torch.Generator().manual_seed(0))
    return block, report


def test_block_finetuning_in_bf16_autocast():
    """finetune_dtype="bfloat16": the block's matmuls run in bf16 (mixed precision), the parameters stay fp32, the
    MSE falls about as far as in fp32, and the report says which precision ran (fp32 runs keep the old report)."""
    dtypes = set()
    bf16_block, bf16 = _finetune_in("bfloat16", dtypes)
    fp32_block, fp32 = _finetune_in("float32")
    assert dtypes == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in bf16_block.parameters())
    assert bf16["dtype"] == "bfloat16" and "dtype" not in fp32
    assert bf16["val_mse"][-1] < 0.7 * bf16["val_mse"][0]
    assert bf16["val_mse"][-1] == pytest.approx(fp32["val_mse"][-1], rel=0.05)


def test_finetune_dtype_is_checked_and_recorded_only_when_set():
    with pytest.raises(ConfigError, match="finetune_dtype"):
        QuantizeSettings(finetune_dtype="fp8").checked()
    assert "finetune_dtype" not in QuantizeSettings().to_dict()
    assert QuantizeSettings(finetune_dtype="auto").to_dict()["finetune_dtype"] == "auto"
