"""End-to-end `aqlm-compile quantize` + `eval` through the CLI on tiny models of two architectures."""

import json

import pytest
import torch
from click.testing import CliRunner

from aqlm_compile.cli import main


def run(args):
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    return result


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_qwen2", "tiny_mistral"])
def test_quantize_and_eval(arch, request, tiny_corpus, tmp_path):
    model_dir = request.getfixturevalue(arch)
    out = tmp_path / "ckpt"
    r = run(["quantize", str(model_dir), "-o", str(out), "--config", "2x8g8", "--dataset", str(tiny_corpus),
             "--preset", "tiny", "--device", "cpu", "--quiet"])
    assert r.exit_code == 0, r.output
    assert (out / "config.json").exists() and (out / "quantize_report.json").exists()
    r = run(["eval", str(out), "--dataset", str(tiny_corpus), "--seqlen", "32", "--windows", "4", "--json"])
    assert r.exit_code == 0, r.output
    result = json.loads(r.output.strip().splitlines()[-1])
    for key in ("ppl", "fp_ppl", "bits_per_param", "rtn_ppl"):
        assert isinstance(result[key], float) and result[key] > 0
    assert result["quantized_layers"] == 14
    # bits/param from the stored tensors: 8-bit codes, fp16 codebooks and scales, over out x in weights
    from safetensors.torch import load_file

    tensors = load_file(str(out / "model.safetensors"))
    bits = params = 0
    for name, codes in tensors.items():
        if name.endswith(".codes"):
            layer = name[: -len(".codes")]
            bits += codes.numel() * 8 + tensors[f"{layer}.codebooks"].numel() * 16 + tensors[f"{layer}.scales"].numel() * 16
            params += codes.shape[0] * codes.shape[1] * 8
    assert result["bits_per_param"] == pytest.approx(bits / params, rel=1e-12)
    # the whole file over every parameter of the FP model (a tied embedding/lm_head counted once)
    from aqlm_compile.models import load_fp_model

    fp, _ = load_fp_model(model_dir)
    assert result["params_all"] == sum(p.numel() for p in fp.parameters())
    assert result["file_bytes"] == (out / "model.safetensors").stat().st_size
    assert result["bits_per_param_all"] == pytest.approx(result["file_bytes"] * 8 / result["params_all"])
    assert result["bits_per_param_all"] > result["bits_per_param"]  # the fp16 embedding costs more than 2 bits
    # an AQLM model of a random-weight LM stays close to it (both near-uniform over the vocabulary)
    assert abs(result["ppl"] - result["fp_ppl"]) / result["fp_ppl"] < 0.2
    r = run(["eval", str(out), "--dataset", str(tiny_corpus), "--seqlen", "32", "--windows", "4"])
    assert "AQLM 2x8g8" in r.output and "RTN" in r.output and "whole checkpoint:" in r.output


def test_quantized_model_tracks_fp_outputs(tiny_llama, tiny_corpus, tmp_path):
    """Block outputs of the quantized model stay close to the FP ones (relative MSE well below 1)."""
    from aqlm_compile.jobs import quantize_job

    report = quantize_job(str(tiny_llama), str(tmp_path / "q"), config="2x8g8", dataset=str(tiny_corpus),
                          preset="tiny", device="cpu")
    for block in report["blocks"]:
        assert block["output_relative_mse"] < 0.5
        for layer in block["layers"].values():
            assert layer["relative_error"] < 0.5


@pytest.mark.parametrize("args,message", [
    (["quantize", "/nonexistent/model", "-o", "X"], "/nonexistent/model: model directory not found"),
    (["quantize", "MODEL", "-o", "X", "--config", "2x8"], "config '2x8': expected MxBgG"),
    (["quantize", "MODEL", "-o", "X", "--dataset", "/no/such.txt"], "/no/such.txt: dataset not found"),
    (["quantize", "MODEL", "-o", "X", "--config", "2x8g7"], "not divisible by in_group_size 7"),
    (["eval", "/nonexistent/ckpt"], "/nonexistent/ckpt: model directory not found"),
])
def test_bad_input_is_one_clear_line(args, message, tiny_llama, tmp_path):
    args = [str(tiny_llama) if a == "MODEL" else str(tmp_path / "out") if a == "X" else a for a in args]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2, r.output
    lines = [l for l in r.output.strip().splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], r.output


def test_malformed_model_dir_is_one_clear_line(tmp_path):
    bad = tmp_path / "model"
    bad.mkdir()
    (bad / "config.json").write_text('{"model_type": "llama"}')  # no weights
    r = CliRunner().invoke(main, ["quantize", str(bad), "-o", str(tmp_path / "out")])
    assert r.exit_code == 2
    assert f"{bad}: could not load as a causal LM" in r.output
    assert not (tmp_path / "out").exists()


def test_eval_of_a_plain_model(tiny_llama, tiny_corpus):
    r = run(["eval", str(tiny_llama), "--dataset", str(tiny_corpus), "--seqlen", "32", "--windows", "2", "--json"])
    result = json.loads(r.output.strip().splitlines()[-1])
    assert result["ppl"] == result["fp_ppl"] and result["bits_per_param"] == 32.0 and result["rtn_ppl"] > 0


def test_bad_checkpoint_is_one_clear_line(tiny_llama, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": {"quant_method": "aqlm"}}))
    r = CliRunner().invoke(main, ["eval", str(bad)])
    assert r.exit_code == 2
    assert "quantization_config.num_codebooks: missing" in r.output


def test_eval_without_a_path_scores_the_default_model(tiny_corpus):
    """`aqlm-compile eval` with no PATH used to end in a TypeError traceback; like `quantize`, it now takes the
    embedded default model (SmolLM2-135M-Instruct, installed by scripts/setup.sh)."""
    from aqlm_compile.models import default_model_dir

    r = CliRunner().invoke(main, ["eval", "--dataset", str(tiny_corpus), "--seqlen", "16", "--windows", "1",
                                  "--no-rtn", "--json"])
    assert r.exit_code == 0, r.output
    result = json.loads(r.output.strip().splitlines()[-1])
    assert result["path"] == str(default_model_dir()) and result["ppl"] > 1
