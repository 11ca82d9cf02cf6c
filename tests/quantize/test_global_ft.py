import pytest

from aqlm_compile.jobs import quantize_job


def test_global_finetune_runs_and_never_worsens_validation(tiny_llama, tiny_corpus, tmp_path):
    report = quantize_job(str(tiny_llama), str(tmp_path / "q"), config="2x4g8", dataset=str(tiny_corpus),
                          preset="tiny", device="cpu",
                          overrides={"global_epochs": 2.0, "global_lr": 1e-3, "global_batch_size": 2})
    g = report["global_finetune"]
    assert g["steps"] == 6  # 2 epochs x 6 training windows / batch 2
    kl = g["val_kl"]
    assert len(kl) >= 2 and all(v >= 0 for v in kl)
    # with lr 1e-3 on a tiny model the KL to the FP teacher goes down within two epochs
    assert min(kl[1:]) < kl[0]
    # timed as its own phase (seconds rounded to 0.1: this tiny run may take less than 0.05 s)
    assert report["timings"]["global_ft"] >= 0 and report["timings"]["global_ft"] <= report["seconds"]


def test_a_nan_validation_loss_is_never_kept_as_the_best():
    """A diverged step (NaN validation KL) used to be taken as the new best state and restored at the end."""
    from aqlm_compile.quantize.global_ft import improves

    nan = float("nan")
    assert improves(0.1, 0.2) and not improves(0.3, 0.2) and not improves(0.2, 0.2)
    assert not improves(nan, 0.2) and not improves(nan, nan)
    assert improves(0.5, nan)  # any finite loss beats a NaN start


def test_blocks_left_in_float_are_not_trained(tiny_llama, tiny_corpus, tmp_path):
    """With --num-blocks, the float blocks stay the FP model's: end-to-end fine-tuning trains the quantized
    block (codebooks, scales) and the norms, never a dense linear."""
    import torch

    from aqlm_compile import format as fmt
    from aqlm_compile.models import load_fp_model

    out = tmp_path / "q"
    report = quantize_job(str(tiny_llama), str(out), config="2x4g8", dataset=str(tiny_corpus), preset="tiny",
                          device="cpu", num_blocks=1,
                          overrides={"global_epochs": 2.0, "global_lr": 1e-3, "global_batch_size": 2})
    kl = report["global_finetune"]["val_kl"]
    assert min(kl[1:]) < kl[0]  # a trained state was kept (not the starting one)
    fp_model = load_fp_model(tiny_llama)
    fp_model = fp_model[0] if isinstance(fp_model, tuple) else fp_model
    fp = dict(fp_model.named_parameters())
    tuned, _, _ = fmt.load(out)
    dense = [n for n, m in tuned.named_modules() if type(m) is torch.nn.Linear and ".layers." in n]
    assert dense and all(".layers.0." not in n for n in dense)
    for name in dense:
        w, ref = tuned.get_submodule(name).weight, fp[name + ".weight"]
        # bit for bit as the FP model has it, or as the checkpoint stores a float weight (fp16)
        assert torch.equal(w, ref.to(w.dtype)) or torch.equal(w, ref.half().to(w.dtype)), name
    assert list(fmt.quantized_modules(tuned)) and all(".layers.0." in n for n in fmt.quantized_modules(tuned))


def test_bfloat16_fine_tuning_is_mixed_precision(tiny_llama, tiny_corpus, tmp_path):
    """train_dtype="bfloat16": the forward runs under bf16 autocast, but the checkpoint's parameters stay fp32 and
    the KL still goes down; the setting is recorded in the checkpoint (fp32 runs keep their old record)."""
    import json

    import torch

    from aqlm_compile import format as fmt
    from aqlm_compile.errors import ConfigError
    from aqlm_compile.quantize.presets import get_preset

    out = tmp_path / "q"
    report = quantize_job(str(tiny_llama), str(out), config="2x4g8", dataset=str(tiny_corpus), preset="tiny",
                          device="cpu", overrides={"global_epochs": 2.0, "global_lr": 1e-3, "global_batch_size": 2,
                                                   "train_dtype": "bfloat16"})
    kl = report["global_finetune"]["val_kl"]
    assert min(kl[1:]) < kl[0]
    tuned, _, _ = fmt.load(out)
    books = [m.codebooks for m in fmt.quantized_modules(tuned).values()]
    assert books and all(b.dtype != torch.bfloat16 for b in books)  # stored as the format stores them, never bf16
    settings = json.loads((out / "config.json").read_text())["aqlm_compile"]["method"]["settings"]
    assert settings["train_dtype"] == "bfloat16"
    assert "train_dtype" not in get_preset("tiny").to_dict()
    try:
        get_preset("tiny", train_dtype="float16")
    except ConfigError as e:
        assert "train_dtype" in str(e)
    else:
        raise AssertionError("train_dtype float16 was accepted")


def test_bfloat16_kl_is_close_to_fp32(tiny_llama):
    """The autocast forward is the same objective to bf16 rounding: the KL of one batch within a few percent."""
    import torch

    from aqlm_compile.models import load_fp_model
    from aqlm_compile.quantize.global_ft import KlObjective

    model = load_fp_model(tiny_llama)
    model = model[0] if isinstance(model, tuple) else model
    torch.manual_seed(0)
    tokens = torch.randint(0, model.config.vocab_size, (2, 32))
    with torch.no_grad():
        teacher = model.model(input_ids=tokens).last_hidden_state
        # a student that differs from the teacher: its final norm scaled
        model.model.norm.weight.mul_(3.0)
    idx = torch.arange(2)
    fp32 = KlObjective(model, tokens, teacher, 2).mean(idx)
    bf16 = KlObjective(model, tokens, teacher, 2, train_dtype="bfloat16").mean(idx)
    assert fp32 > 0.01
    assert bf16 != fp32  # the autocast forward did run in bf16
    assert abs(bf16 - fp32) < 0.05 * fp32, (bf16, fp32)


def test_auto_train_dtype_is_bf16_only_where_native():
    """"auto" picks bf16 autocast on a CPU with native bf16 dot products and fp32 elsewhere (emulated bf16 is
    slower than fp32); explicit settings are kept."""
    import torch

    from aqlm_compile.quantize.precision import resolve_train_dtype

    cpu = torch.device("cpu")
    assert resolve_train_dtype("auto", cpu, {"avx2", "avx512f", "avx512_bf16"}) == "bfloat16"
    assert resolve_train_dtype("auto", cpu, {"fp", "asimd", "bf16"}) == "bfloat16"  # Arm's Features line
    assert resolve_train_dtype("auto", cpu, {"avx2", "fma", "avx512f"}) == "float32"
    assert resolve_train_dtype("auto", cpu, set()) == "float32"
    assert resolve_train_dtype("float32", cpu, {"avx512_bf16"}) == "float32"
    assert resolve_train_dtype("bfloat16", cpu, set()) == "bfloat16"



def test_linear_lr_decay_reaches_zero_at_the_end_and_is_recorded(tiny_llama, tiny_corpus, tmp_path):
    """global_lr_decay="linear": the lr falls from global_lr to global_lr/steps at the last step; the run still
    lowers the KL, the setting is recorded (a constant lr keeps the old record), a bad name is refused."""
    import json

    from aqlm_compile.errors import ConfigError
    from aqlm_compile.quantize.global_ft import lr_factor
    from aqlm_compile.quantize.presets import get_preset

    assert [lr_factor("linear", i, 4) for i in range(4)] == [1.0, 0.75, 0.5, 0.25]
    assert [lr_factor("constant", i, 4) for i in range(4)] == [1.0] * 4
    out = tmp_path / "q"
    report = quantize_job(str(tiny_llama), str(out), config="2x4g8", dataset=str(tiny_corpus), preset="tiny",
                          device="cpu", overrides={"global_epochs": 2.0, "global_lr": 1e-3, "global_batch_size": 2,
                                                   "global_lr_decay": "linear"})
    g = report["global_finetune"]
    assert g["lr_decay"] == "linear" and min(g["val_kl"][1:]) < g["val_kl"][0]
    settings = json.loads((out / "config.json").read_text())["aqlm_compile"]["method"]["settings"]
    assert settings["global_lr_decay"] == "linear"
    assert "global_lr_decay" not in get_preset("quality").to_dict()
    assert get_preset("fast").to_dict()["global_lr_decay"] == "linear"
    with pytest.raises(ConfigError, match="global_lr_decay 'cosine'"):
        get_preset("fast", global_lr_decay="cosine")
