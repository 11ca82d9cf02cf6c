"""The quantization-method seam (quantize/methods.py): a method registered from outside the package runs through
the block loop and the job unchanged, its name/version/settings land in config.json, resume refuses a different
method or different settings, and settings are versioned dataclasses that round-trip and reject unknown fields."""

import hashlib
import json
import subprocess
import sys
from dataclasses import dataclass
from typing import ClassVar

import pytest

from aqlm_compile import format as fmt
from aqlm_compile.errors import ConfigError, FormatError
from aqlm_compile.jobs import quantize_job, work_folder_for
from aqlm_compile.nn import AqlmLinear
from aqlm_compile.quantize.layer import init_codes
from aqlm_compile.quantize.methods import (METHODS, MethodSettings, QuantizationMethod, get_method,
                                           method_from_record, method_names, register_method)
from aqlm_compile.quantize.presets import PRESETS, QuantizeSettings, get_preset


@dataclass(frozen=True)
class KmeansOnlySettings(MethodSettings):
    version: ClassVar[int] = 3

    kmeans_iters: int = 2
    kmeans_max_points: int | None = None


class KmeansOnly(QuantizationMethod):
    """A toy method: residual k-means on each weight (no Hessian, no rounds, no fine-tuning); counts its hooks."""

    name = "test-kmeans-only"
    settings_class = KmeansOnlySettings
    presets = {"tiny": KmeansOnlySettings(nsamples=8, val_size=2, seqlen=32)}
    phases = ("kmeans",)
    calls: ClassVar[dict] = {}

    def quantize_block(self, block, ctx):
        self.calls.setdefault("blocks", []).append(ctx.index)
        assert ctx.hessians.keys() == ctx.linears.keys() and ctx.targets.shape == ctx.inputs.shape
        config = ctx.run.config
        with ctx.run.timed("kmeans"):
            for li, (name, linear) in enumerate(ctx.linears.items()):
                codes, codebooks, scales = init_codes(linear.weight.detach().float(), config, self.settings,
                                                      ctx.run.generator(ctx.index, li))
                fmt.replace_module(block, name, AqlmLinear.from_parts(
                    codes, codebooks, scales, config, bias=None if linear.bias is None else linear.bias.detach()))
        return {"kmeans_layers": len(ctx.linears)}

    def finish(self, model, ctx):
        self.calls["finish"] = self.calls.get("finish", 0) + 1
        assert ctx.teacher is None  # needs_teacher() is False
        return {"kmeans_only": {"blocks": len(self.calls["blocks"])}}


@pytest.fixture
def kmeans_only():
    KmeansOnly.calls = {}
    register_method(KmeansOnly)
    yield KmeansOnly
    METHODS.pop(KmeansOnly.name, None)


def digest(path):
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


def test_registered_method_runs_through_the_job_and_is_recorded(kmeans_only, tiny_llama, tiny_corpus, tmp_path):
    assert kmeans_only.name in method_names() and get_method(kmeans_only.name) is kmeans_only
    out = tmp_path / "q"
    report = quantize_job(str(tiny_llama), str(out), config="2x8g8", dataset=str(tiny_corpus), preset="tiny",
                          method=kmeans_only.name, device="cpu", overrides={"kmeans_iters": 1})
    assert kmeans_only.calls == {"blocks": [0, 1], "finish": 1}
    assert [b["kmeans_layers"] for b in report["blocks"]] == [7, 7]
    assert report["kmeans_only"] == {"blocks": 2} and "kmeans" in report["timings"]
    assert report["method"] == {"name": kmeans_only.name, "version": 3}

    raw = json.loads((out / "config.json").read_text())
    assert raw["aqlm_compile"]["method"] == {
        "name": kmeans_only.name, "version": 3,
        "settings": {"nsamples": 8, "val_size": 2, "seqlen": 32, "kmeans_iters": 1, "kmeans_max_points": None}}
    assert raw["quantization_config"]["quant_method"] == "aqlm"  # still a Hugging Face AQLM checkpoint
    model, config, meta = fmt.load(out)
    assert config.name == "2x8g8" and len(fmt.quantized_modules(model)) == 14
    assert method_from_record(meta["method"]).settings == KmeansOnlySettings(nsamples=8, val_size=2, seqlen=32,
                                                                              kmeans_iters=1)


def test_registered_method_resumes_bit_identically(kmeans_only, tiny_llama, tiny_corpus, tmp_path):
    common = dict(config="2x4g8", dataset=str(tiny_corpus), preset="tiny", method=kmeans_only.name, device="cpu")
    quantize_job(str(tiny_llama), str(tmp_path / "full"), **common)
    part = tmp_path / "part"
    with pytest.raises(KeyboardInterrupt):
        quantize_job(str(tiny_llama), str(part), stop_after_block=0, **common)
    report = quantize_job(str(tiny_llama), str(part), resume=True, **common)
    assert [b["block"] for b in report["blocks"]] == [0, 1]
    assert digest(part) == digest(tmp_path / "full")


def test_resume_refuses_another_method_or_other_settings(kmeans_only, tiny_llama, tiny_corpus, tmp_path):
    out = tmp_path / "q"
    common = dict(config="2x4g8", dataset=str(tiny_corpus), preset="tiny", device="cpu")
    with pytest.raises(KeyboardInterrupt):
        quantize_job(str(tiny_llama), str(out), method="aqlm", stop_after_block=0, **common)
    with pytest.raises(FormatError, match=r"different settings \(method\)"):
        quantize_job(str(tiny_llama), str(out), method=kmeans_only.name, resume=True, **common)
    with pytest.raises(FormatError, match=r"different settings \(method\)"):
        quantize_job(str(tiny_llama), str(out), method="aqlm", resume=True, overrides={"finetune_epochs": 2},
                     **common)
    assert (work_folder_for(out) / "blocks" / "0.safetensors").exists()  # a refused resume leaves the work alone


def one_line_config_error(call, *fragments):
    with pytest.raises(ConfigError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and all(f in message for f in fragments), message


def test_unknown_method_is_one_line_naming_the_known_ones(tiny_llama, tmp_path):
    one_line_config_error(lambda: get_method("pv-tuning"), "method 'pv-tuning'", "aqlm")
    one_line_config_error(lambda: quantize_job(str(tiny_llama), str(tmp_path / "q"), method="nope", preset="tiny"),
                          "method 'nope'", "expected one of aqlm")


def test_unknown_settings_field_is_one_line_naming_it(kmeans_only):
    one_line_config_error(lambda: QuantizeSettings.from_dict({"nsamples": 8, "beam_width": 2}), "beam_width")
    one_line_config_error(lambda: kmeans_only.from_preset("tiny", {"beam_size": 2}), "beam_size")
    one_line_config_error(lambda: get_preset("tiny", beam_width=2), "unknown setting(s): beam_width")
    one_line_config_error(lambda: kmeans_only.from_preset("fast"), "preset 'fast'", "tiny")
    one_line_config_error(lambda: QuantizeSettings.from_dict({"codebook_solver": "sgd"}), "codebook_solver 'sgd'")
    record = get_method("aqlm").from_preset("tiny").record()
    one_line_config_error(lambda: method_from_record({**record, "version": 2}), "version 2", "version 1")
    one_line_config_error(lambda: method_from_record({**record, "settings": {"typo": 1}}), "typo")


def test_set_assignments_are_typed_by_their_fields_and_recorded(tiny_llama, tiny_corpus, tmp_path):
    """`quantize --set NAME=VALUE`: each value read as its field's type; bad pairs are one line; the named CLI
    options win; the run records what it used."""
    got = QuantizeSettings.parse_assignments(["global_lr=1e-5", "finetune_epochs=2", "kmeans_max_points=none",
                                              "codebook_solver=adam"])
    assert got == {"global_lr": 1e-5, "finetune_epochs": 2, "kmeans_max_points": None, "codebook_solver": "adam"}
    assert isinstance(got["finetune_epochs"], int) and isinstance(got["global_lr"], float)
    one_line_config_error(lambda: QuantizeSettings.parse_assignments(["global_lr"]), "expected NAME=VALUE")
    one_line_config_error(lambda: QuantizeSettings.parse_assignments(["beam_width=2"]), "beam_width")
    one_line_config_error(lambda: QuantizeSettings.parse_assignments(["finetune_epochs=2.5"]), "expected int")
    one_line_config_error(lambda: QuantizeSettings.parse_assignments(["beam_size=none"]), "expected int")
    quantize_job(str(tiny_llama), str(tmp_path / "q"), config="2x4g8", dataset=str(tiny_corpus), preset="tiny",
                 device="cpu", num_blocks=1, overrides={"nsamples": 6},
                 assignments=["nsamples=4", "max_rounds=1", "finetune_lr=3e-4"])
    recorded = json.loads((tmp_path / "q" / "config.json").read_text())["aqlm_compile"]["method"]["settings"]
    assert recorded["max_rounds"] == 1 and recorded["finetune_lr"] == 3e-4 and recorded["nsamples"] == 6


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_settings_round_trip_and_carry_their_version(preset):
    settings = PRESETS[preset]
    data = settings.to_dict()
    assert "version" not in data and QuantizeSettings.version == 1
    assert QuantizeSettings.from_dict(json.loads(json.dumps(data))) == settings
    aqlm = get_method("aqlm").from_preset(preset, {"seqlen": 64})
    assert aqlm.settings == get_preset(preset, seqlen=64)  # the method's presets are exactly get_preset's
    record = aqlm.record()
    assert record == {"name": "aqlm", "version": 1, "settings": aqlm.settings.to_dict()}
    again = method_from_record(json.loads(json.dumps(record)))
    assert type(again) is type(aqlm) and again.settings == aqlm.settings
    toy = KmeansOnlySettings(kmeans_iters=5)
    assert KmeansOnlySettings.from_dict(toy.to_dict()) == toy and KmeansOnlySettings.version == 3


def test_listing_methods_does_not_load_torch():
    """The CLI can offer `--method` choices without paying for the quantizer's imports."""
    code = ("import sys; from aqlm_compile.quantize.methods import method_names; "
            "print(method_names(), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split("] ")[1].strip() == "False" and "'aqlm'" in out


def test_cli_method_and_preset_come_from_the_registry(tmp_path):
    """`quantize --method` lists the registered methods; `--preset` is checked by the method (its own list)."""
    from click.testing import CliRunner

    from aqlm_compile.cli import main

    r = CliRunner().invoke(main, ["quantize", "-o", str(tmp_path / "out"), "--preset", "nope"])
    assert r.exit_code == 2 and "preset 'nope': expected one of fast, quality, pv, paper, tiny" in r.output, r.output
    r = CliRunner().invoke(main, ["quantize", "-o", str(tmp_path / "out"), "--method", "nope"])
    assert r.exit_code == 2 and "Invalid value for '--method'" in r.output and "aqlm" in r.output
    assert not (tmp_path / "out").exists()
