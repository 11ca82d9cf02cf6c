"""`quantize --bits` (quantize/bit_budget.py): the fixed parts counted exactly, the output Fisher, a plan that meets
its budget and follows the sensitivities, and the job end to end (mixed checkpoint, resume, eval, one-line errors)."""

import hashlib
import json

import pytest
import torch
from click.testing import CliRunner

from aqlm_compile import format as fmt
from aqlm_compile.cli import main
from aqlm_compile.config import AqlmConfig
from aqlm_compile.errors import ConfigError, ModelError
from aqlm_compile.evaluate import param_counts
from aqlm_compile.jobs import eval_job, quantize_job
from aqlm_compile.models import block_linears, decoder_layers, load_fp_model
from aqlm_compile.quantize import bit_budget
from aqlm_compile.quantize.bit_budget import (candidate_configs, fixed_bits, max_codebooks_for, output_fisher,
                                              output_fisher_by_blocks, plan_bits)

BASE = AqlmConfig.parse("2x4g8")  # 16-codeword books: on 64-wide layers the codebooks do not swamp the codes


def _fp(path):
    model, _ = load_fp_model(path)
    model.eval()
    return model


def _rest_params(model):
    """Parameters that are neither the embedding/head tables nor block linear weights (norms, biases)."""
    skip = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    skip |= {id(m.weight) for layer in decoder_layers(model)[1] for m in block_linears(layer).values()}
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


def test_fixed_bits_counts_each_embedding_form(tiny_llama, tiny_qwen2):
    tied = _fp(tiny_llama)
    v, h = tied.get_input_embeddings().weight.shape
    rest = 16 * _rest_params(tied)
    assert fixed_bits(tied, "stored", None) == 16 * v * h + rest  # one fp16 table serves both
    assert fixed_bits(tied, "int8", None) == (8 * v * h + 32 * v) + 16 * v * h + rest  # the head keeps fp16
    assert fixed_bits(tied, "int4", None) == (4 * v * h + 16 * v * (h // 32)) + 16 * v * h + rest
    head = AqlmConfig.parse("2x8g8")
    assert fixed_bits(tied, "head", head) == head.layer_bits(v, h) + rest
    assert fixed_bits(tied, "stored", head) == 16 * v * h + head.layer_bits(v, h) + rest
    with pytest.raises(ValueError, match="--embedding head: needs --head-config"):
        fixed_bits(tied, "head", None)
    # an int8 head: with the embedding stored, both read the one int8 table (as evaluate.weight_bits counts it)
    assert fixed_bits(tied, "stored", None, "int8") == (8 * v * h + 32 * v) + rest
    assert fixed_bits(tied, "int4", None, "int8") == (4 * v * h + 16 * v * (h // 32)) + (8 * v * h + 32 * v) + rest
    with pytest.raises(ValueError, match="--head int8: the lm_head is quantized"):
        fixed_bits(tied, "stored", head, "int8")
    untied = _fp(tiny_qwen2)
    v, h = untied.get_input_embeddings().weight.shape
    assert fixed_bits(untied, "stored", None) == 2 * 16 * v * h + 16 * _rest_params(untied)
    with pytest.raises(ValueError, match="tied"):
        fixed_bits(untied, "head", head)


def test_output_fisher_is_the_mean_squared_output_gradient(tiny_llama, tiny_corpus):
    model = _fp(tiny_llama)
    windows = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    fisher = output_fisher(model, windows)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    assert set(fisher) == set(names)
    assert all(p.requires_grad for p in model.parameters())  # the caller's flags come back
    # by hand, for one layer: retain the output's gradient and average its square over the tokens
    target = dict(model.named_modules())["model.layers.1.mlp.down_proj"]
    outs = []
    def keep(module, args, out):
        out.retain_grad()
        outs.append(out)

    handle = target.register_forward_hook(keep)
    total = 0
    for i in range(2):
        logits = model(input_ids=windows[i : i + 1], use_cache=False).logits.float()
        torch.nn.functional.cross_entropy(logits[0, :-1], windows[i, 1:], reduction="sum").backward()
        total = total + outs[-1].grad.pow(2).reshape(-1, outs[-1].shape[-1]).sum(0)
    handle.remove()
    assert torch.allclose(fisher["model.layers.1.mlp.down_proj"], total / 24, rtol=1e-4, atol=1e-10)
    assert all(bool((f >= 0).all()) and float(f.sum()) > 0 for f in fisher.values())


def _bounds(model, embedding="stored", head=None, head_form="fp16"):
    """(bits with every linear at 1 codebook, at 4) for the whole model (a dense head in `head_form`)."""
    fixed = fixed_bits(model, embedding, head, head_form)
    linears = [m for layer in decoder_layers(model)[1] for m in block_linears(layer).values()]
    one, four = candidate_configs(BASE, 4)[0], candidate_configs(BASE, 4)[-1]
    return (fixed + sum(one.layer_bits(m.out_features, m.in_features) for m in linears),
            fixed + sum(four.layer_bits(m.out_features, m.in_features) for m in linears))


def _windows(model, n=4, seqlen=16):
    return torch.randint(0, model.config.vocab_size, (n, seqlen), generator=torch.Generator().manual_seed(1))


def test_plan_meets_the_budget_and_keeps_shared_inputs_together(tiny_llama):
    model = _fp(tiny_llama)
    params_all, _ = param_counts(model)
    low, high = _bounds(model)
    fixed = fixed_bits(model, "stored", None)
    for bits in (low / params_all + 1e-9, (low + high) / 2 / params_all, high / params_all + 0.1):
        plan = plan_bits(model, _windows(model), BASE, bits, params_all, fixed, seed=0, kmeans_iters=3)
        assert plan.fixed_bits + plan.planned_bits <= bits * params_all
        assert plan.planned_bits == sum(plan.configs[n].layer_bits(m.out_features, m.in_features)
                                        for n, m in model.named_modules() if n in plan.configs)
        for i in range(2):  # q/k/v read one input, gate/up another: one config each
            c = lambda s: plan.configs[f"model.layers.{i}.{s}"].name  # noqa: E731
            assert c("self_attn.q_proj") == c("self_attn.k_proj") == c("self_attn.v_proj")
            assert c("mlp.gate_proj") == c("mlp.up_proj")
    assert {c.name for c in plan.configs.values()} == {"4x4g8"}  # above the top, everything at the top
    low_plan = plan_bits(model, _windows(model), BASE, low / params_all + 1e-9, params_all, fixed, seed=0,
                         kmeans_iters=3)
    assert {c.name for c in low_plan.configs.values()} == {"1x4g8"}
    with pytest.raises(ConfigError, match=r"--bits .*below the smallest possible"):
        plan_bits(model, _windows(model), BASE, 0.9 * low / params_all, params_all, fixed, seed=0, kmeans_iters=3)


def test_plan_follows_the_sensitivities(tiny_llama, monkeypatch):
    """Codebooks go where the loss feels the error: make one layer's outputs matter a million times more and it
    gets the most codebooks; make another's not matter at all and it gets the fewest."""
    model = _fp(tiny_llama)
    params_all, _ = param_counts(model)
    low, high = _bounds(model)
    fixed = fixed_bits(model, "stored", None)
    real = output_fisher

    def skewed(m, w):
        f = real(m, w)
        f["model.layers.0.mlp.down_proj"] = f["model.layers.0.mlp.down_proj"] * 1e6
        f["model.layers.1.self_attn.o_proj"] = f["model.layers.1.self_attn.o_proj"] * 0
        return f

    monkeypatch.setattr(bit_budget, "output_fisher", skewed)
    plan = plan_bits(model, _windows(model), BASE, (low + 0.3 * (high - low)) / params_all, params_all, fixed,
                     seed=0, kmeans_iters=3)
    assert plan.configs["model.layers.0.mlp.down_proj"].name == "4x4g8"
    assert plan.configs["model.layers.1.self_attn.o_proj"].name == "1x4g8"
    assert len({c.name for c in plan.configs.values()}) > 1


def _digest(path):
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


def _fp_blocks(layers):
    return [i for i, layer in enumerate(layers)
            if any(isinstance(m, torch.nn.Linear) and not m.weight.is_meta for m in layer.modules())]


def test_a_lazily_loaded_model_is_planned_one_block_at_a_time(tiny_llama, tiny_corpus, tmp_path):
    """--bits with --offload disk (issue 16): the Fisher pass runs block by block (forward keeping each block's
    inputs on disk, then each block's backward from the last to the first) and the plan reads one FP block at a
    time; the Fisher and the plan are the whole model's, and the job writes the whole-model run's checkpoint."""
    whole = _fp(tiny_llama)
    lazy, _ = load_fp_model(tiny_llama, lazy=True)
    windows = _windows(whole)
    spill = tmp_path / "spill"
    spill.mkdir()
    expected, got = output_fisher(whole, windows), output_fisher_by_blocks(lazy, windows, spill)
    assert expected.keys() == got.keys()
    for name in expected:  # the same operations per block: equal here, allowed to differ by rounding
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=0)
    assert list(spill.iterdir()) == []  # every activation file removed

    _, layers = decoder_layers(lazy)
    seen, original = [], lazy.aqlm_lazy_blocks.load

    def load(i):
        layer = original(i)
        seen.append((i, _fp_blocks(layers)))
        return layer

    lazy.aqlm_lazy_blocks.load = load
    params_all, _ = param_counts(whole)
    fixed = fixed_bits(whole, "stored", None)
    low, high = _bounds(whole)
    bits = (low + 0.4 * (high - low)) / params_all
    plan = plan_bits(lazy, windows, BASE, bits, params_all, fixed, seed=0, kmeans_iters=3, spill=spill)
    n = len(layers)
    # forward, backward (last to first), then the options block by block: never two FP blocks in memory
    assert seen == [(i, [i]) for i in range(n)] + [(i, [i]) for i in reversed(range(n))] + \
        [(i, [i]) for i in range(n)]
    reference = plan_bits(whole, windows, BASE, bits, params_all, fixed, seed=0, kmeans_iters=3)
    assert {k: c.name for k, c in plan.configs.items()} == {k: c.name for k, c in reference.configs.items()}

    common = dict(config=BASE.name, dataset=str(tiny_corpus), preset="tiny", device="cpu",
                  bits=round(bits, 3), overrides={"kmeans_iters": 3, "max_rounds": 1})
    quantize_job(str(tiny_llama), str(tmp_path / "disk"), offload="disk", **common)
    quantize_job(str(tiny_llama), str(tmp_path / "none"), offload="none", **common)
    assert _digest(tmp_path / "disk") == _digest(tmp_path / "none")
    report = json.loads((tmp_path / "disk" / "quantize_report.json").read_text())
    assert report["offload"] == "disk"


def test_bits_job_writes_a_mixed_checkpoint_that_resumes_and_evaluates(tiny_llama, tiny_corpus, tmp_path,
                                                                     monkeypatch):
    model = _fp(tiny_llama)
    params_all, _ = param_counts(model)
    low, high = _bounds(model, "int8", head_form="int8")  # no --head: the dense head budgeted as int8 rows
    bits = round((low + 0.5 * (high - low)) / params_all, 3)
    common = dict(config=BASE.name, dataset=str(tiny_corpus), preset="tiny", device="cpu", bits=bits,
                  embedding="int8", overrides={"kmeans_iters": 3, "max_rounds": 1})
    full = tmp_path / "full"
    report = quantize_job(str(tiny_llama), str(full), **common)
    assert "bit_plan" in report["timings"]  # the plan's own time, apart from loading
    raw = json.loads((full / "config.json").read_text())
    block = raw["aqlm_compile"]
    assert block["embedding"] == "int8" and block["bit_plan"]["bits_per_param"] == bits
    assert block["dense_head"] == "int8"  # the default form, recorded
    assert block["bit_plan"]["total_bits_per_param"] <= bits
    assert "transformers + aqlm" in block["mixed_configs"] and block["layer_configs"]
    loaded, config, meta = fmt.load(full)
    layers = fmt.quantized_modules(loaded)
    assert len({m.config.name for m in layers.values()}) > 1
    assert config.name == block["config"] and config.num_codebooks == raw["quantization_config"]["num_codebooks"]
    assert all(m.config.name == block["layer_configs"].get(n, config.name) for n, m in layers.items())
    # the checkpoint's weights as the artifact stores them (int8 embedding) are within the budget
    result = eval_job(str(full), dataset=str(tiny_corpus), seqlen=16, windows=2, rtn=False, embedding="int8")
    assert result["ppl"] > 1 and result["weight_bits_per_param_all"] <= bits
    # eval counts exactly what the plan counted: same parameters, same bits
    assert result["params_all"] == block["bit_plan"]["params_all"]
    assert result["weight_bits_per_param_all"] == pytest.approx(block["bit_plan"]["total_bits_per_param"], abs=1e-4)

    # interrupted after block 0, resumed: the plan is the interrupted run's (not measured again), the result the same
    part = tmp_path / "part"
    with pytest.raises(KeyboardInterrupt):
        quantize_job(str(tiny_llama), str(part), stop_after_block=0, **common)

    def no_second_plan(*a, **k):
        raise AssertionError("the plan was measured again on --resume")

    monkeypatch.setattr(bit_budget, "plan_bits", no_second_plan)
    quantize_job(str(tiny_llama), str(part), resume=True, **common)
    assert _digest(part) == _digest(full)


def test_a_budget_above_the_base_buys_more_codebooks_than_it_has(tiny_llama):
    """The plan offers up to twice the base's codebooks (at least 4): a 3x4g8 base with a budget above its own
    bits puts more than 3 codebooks on some layers, and never past 6."""
    assert [max_codebooks_for(AqlmConfig.parse(c)) for c in ("1x8g8", "2x8g8", "3x8g8", "4x8g8")] == [4, 4, 6, 8]
    model = _fp(tiny_llama)
    params_all, _ = param_counts(model)
    base = AqlmConfig.parse("3x4g8")
    fixed = fixed_bits(model, "stored", None)
    linears = [m for layer in decoder_layers(model)[1] for m in block_linears(layer).values()]
    own = fixed + sum(base.layer_bits(m.out_features, m.in_features) for m in linears)
    top = AqlmConfig.parse("6x4g8")
    most = fixed + sum(top.layer_bits(m.out_features, m.in_features) for m in linears)
    plan = plan_bits(model, _windows(model), base, (own + 0.5 * (most - own)) / params_all, params_all, fixed,
                     seed=0, kmeans_iters=3)
    counts = {c.num_codebooks for c in plan.configs.values()}
    assert max(counts) > 3 and max(counts) <= 6, counts
    assert plan.fixed_bits + plan.planned_bits <= (own + 0.5 * (most - own))


def test_bits_with_an_int8_head_is_recorded_and_counted_by_eval(tiny_llama, tiny_corpus, tmp_path):
    """`quantize --bits B --head int8` budgets the tied table once, as int8 rows; the checkpoint records the form
    and `eval` (no --head given) scores and counts the model that way — the same bits the plan counted."""
    model = _fp(tiny_llama)
    params_all, _ = param_counts(model)
    low, high = _bounds(model, "stored")
    fixed8 = fixed_bits(model, "stored", None, "int8")
    bits = round((low + 0.5 * (high - low)) / params_all, 3)
    ckpt = tmp_path / "q"
    quantize_job(str(tiny_llama), str(ckpt), config=BASE.name, dataset=str(tiny_corpus), preset="tiny",
                 device="cpu", bits=bits, head="int8", overrides={"kmeans_iters": 3, "max_rounds": 1})
    block = json.loads((ckpt / "config.json").read_text())["aqlm_compile"]
    assert block["dense_head"] == "int8" and block["bit_plan"]["fixed_bits"] == fixed8
    r = CliRunner().invoke(main, ["eval", str(ckpt), "--dataset", str(tiny_corpus), "--seqlen", "16", "--windows",
                                  "2", "--no-rtn", "--json"])
    assert r.exit_code == 0, r.output
    result = json.loads(r.output[r.output.index("{"):])
    assert result["head"] == "int8"
    assert result["weight_bits_per_param_all"] == pytest.approx(block["bit_plan"]["total_bits_per_param"], abs=1e-4)
    as_fp16 = eval_job(str(ckpt), dataset=str(tiny_corpus), seqlen=16, windows=2, rtn=False, fp=False, head="fp16")
    assert as_fp16["weight_bits_per_param_all"] > result["weight_bits_per_param_all"]
    assert as_fp16["ppl"] != result["ppl"]  # the int8 rows are what was scored


@pytest.mark.parametrize("args, fragment", [
    (["--embedding", "int8"], "--embedding: only with --bits"),
    (["--head", "int8"], "--head: only with --bits"),
    (["--bits", "4", "--head", "int8", "--head-config", "2x4g8"], "--head int8: not with --head-config"),
    (["--bits", "17"], "--bits 17.0: expected a budget between 0 and 16"),
    (["--bits", "0.5"], "--bits 0.5: below the smallest possible"),
    (["--bits", "4", "--embedding", "head"], "--embedding head: needs --head-config"),
])
def test_bits_options_fail_in_one_line(tiny_llama, tiny_corpus, tmp_path, args, fragment):
    r = CliRunner().invoke(main, ["quantize", str(tiny_llama), "-o", str(tmp_path / "q"), "--preset", "tiny",
                                  "--config", BASE.name, "--dataset", str(tiny_corpus), *args])
    assert r.exit_code != 0 and fragment in r.output, r.output
    assert r.output.strip().count("\n") == 0 or "error:" in r.output.splitlines()[-1]
    assert not (tmp_path / "q").exists()


def test_bits_with_from_checkpoint_is_refused(tiny_llama, tmp_path):
    with pytest.raises(ModelError, match="--bits: not with --from-checkpoint"):
        quantize_job(str(tiny_llama), str(tmp_path / "q"), preset="pv", bits=3.0, from_checkpoint=str(tmp_path))


def test_mixed_checkpoint_builds_with_its_recorded_embedding_and_matches_torch(tiny_llama, tiny_corpus, tmp_path):
    """A `--bits` checkpoint (several configs, q/k/v fused only where one config) compiles for x86 with no
    --embedding given: the artifact takes the form the budget counted (int8 rows), and both runtimes equal the
    PyTorch model with that embedding. (The int8 embedding's own artifact check lives here: test_quantized_head.py
    checks head and int4.)"""
    import numpy as np
    import onnx

    from aqlm_compile.embedding import compact_embedding
    from aqlm_compile.runtime.ort import OrtDecoder
    from aqlm_compile.runtime.tvm_runtime import TvmDecoder

    from .test_quantized_head import torch_logits

    model = _fp(tiny_llama)
    params_all, _ = param_counts(model)
    low, high = _bounds(model, "int8")
    ckpt = tmp_path / "q"
    quantize_job(str(tiny_llama), str(ckpt), config=BASE.name, dataset=str(tiny_corpus), preset="tiny", device="cpu",
                 bits=round((low + 0.5 * (high - low)) / params_all, 3), embedding="int8", head="fp16",
                 overrides={"kmeans_iters": 3, "max_rounds": 1})
    configs = {m.config.name for m in fmt.quantized_modules(fmt.load(ckpt)[0]).values()}
    assert len(configs) > 1, configs
    art = tmp_path / "art"
    r = CliRunner().invoke(main, ["build", str(ckpt), "--target", "x86", "-o", str(art),
                                  "--prefill", "fp32"])  # compared with PyTorch to 1e-4
    assert r.exit_code == 0, r.output
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["embedding"] == "int8"
    graph = onnx.load(str(art / "onnx" / "model.onnx")).graph
    # the embedding as int8 rows; the untied lm_head as stored (fp16), the weight of the graph's one DenseMatMul
    tables = {t.name: t.data_type for t in graph.initializer if list(t.dims) == [259, 64]}
    (dense,) = [n for n in graph.node if n.op_type == "DenseMatMul"]
    assert sorted(tables.values()) == [onnx.TensorProto.INT8, onnx.TensorProto.FLOAT16], tables
    assert tables[dense.input[1]] == onnx.TensorProto.FLOAT16
    steps = [[1, 5, 9, 13, 17, 21, 25, 29, 33, 37, 41], [7], [8]]
    want = torch_logits(ckpt, steps, lambda m: compact_embedding(m, "int8"))
    for dec in (TvmDecoder(art, threads=1), OrtDecoder(art, threads=1)):
        for ids, w in zip(steps, want):
            got = dec.step(np.array(ids))
            assert np.abs(got - w).max() <= 1e-4 * max(1.0, np.abs(w).max()), (type(dec).__name__, ids)
