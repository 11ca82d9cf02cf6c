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
