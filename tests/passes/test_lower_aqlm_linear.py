"""lower_aqlm_linear before/after, on the exported tiny decoder."""

import pytest
import torch

from aqlm_compile.errors import ConfigError
from aqlm_compile.export import example_inputs, export_decoder, load_for_export
from aqlm_compile.passes.lower_aqlm_linear import lower_aqlm_linear
from aqlm_compile.passes.pipeline import run_pipeline


def targets(ep):
    return [n.target for n in ep.graph_module.graph.nodes if n.op == "call_function"]


@pytest.fixture()
def exported(tiny_llama_ckpt):
    model, _ = load_for_export(tiny_llama_ckpt)
    return export_decoder(model)


def test_before_after(exported):
    ep, spec = exported
    inputs = example_inputs(spec, seq=3, past=4)
    with torch.no_grad():
        before_out = ep.module()(*inputs)
    before = targets(ep)
    assert before.count(torch.ops.aqlm.dequantize.default) == 14
    assert torch.ops.aqlm.aqlm_gemm.default not in before
    report = lower_aqlm_linear(ep, name_prefix="model.")
    after = targets(ep)
    assert torch.ops.aqlm.dequantize.default not in after
    assert after.count(torch.ops.aqlm.aqlm_gemm.default) == 14
    assert after.count(torch.ops.aten.linear.default) == before.count(torch.ops.aten.linear.default) - 14  # lm_head stays
    assert report["lowered"][0] == "model.layers.0.self_attn.q_proj" and set(report["configs"].values()) == {"2x8g8"}
    with torch.no_grad():
        after_out = ep.module()(*inputs)
    for a, b in zip(before_out, after_out):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


def test_unsupported_config_is_reported_by_name(exported):
    ep, _ = exported
    with pytest.raises(ConfigError, match=r"model\.layers\.1\.mlp\.down_proj: config 2x8g8 has no kernel"):
        lower_aqlm_linear(ep, supports=lambda config: False, name_prefix="model.")


def test_dequantize_feeding_something_else_is_not_left_dense():
    class Weird(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.codes = torch.nn.Parameter(torch.zeros(4, 2, 1, dtype=torch.int8), requires_grad=False)
            self.codebooks = torch.nn.Parameter(torch.randn(1, 256, 1, 8).half(), requires_grad=False)
            self.scales = torch.nn.Parameter(torch.ones(4, 1, 1, 1).half(), requires_grad=False)

        def forward(self, x):
            w = torch.ops.aqlm.dequantize(self.codes, self.codebooks, self.scales)
            return x @ w.T  # a matmul, not aten.linear: nothing to lower it to

    ep = torch.export.export(Weird(), (torch.randn(2, 16),))
    with pytest.raises(ConfigError, match="codes: its weight feeds"):
        lower_aqlm_linear(ep)


def test_pipeline_dumps_ir_after_each_phase(exported, tmp_path):
    ep, _ = exported
    report = run_pipeline(ep, dump_ir=tmp_path, name_prefix="model.")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00-exported.txt", "01-lower_aqlm_linear.txt",
                                                          "02-fuse_shared_input.txt", "03-fold_parameter_cats.txt"]
    assert "aqlm.dequantize" in (tmp_path / "00-exported.txt").read_text()
    assert "aqlm.aqlm_gemm" in (tmp_path / "01-lower_aqlm_linear.txt").read_text()
    assert "partitions = [64, 32, 32]" in (tmp_path / "02-fuse_shared_input.txt").read_text()
    assert len(report["lower_aqlm_linear"]["lowered"]) == 14
    assert report["fold_parameter_cats"] == {"skipped": True}  # the ONNX route's default: ORT folds the cats
