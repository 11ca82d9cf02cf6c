"""`quantize --head-config`: the lm_head quantized too (issue 14 item 1), with the body's config (a uniform checkpoint
that transformers + aqlm still load) or its own (recorded in config.json's aqlm_compile.layer_configs); the
artifacts built from it run in ORT and the TVM runtime with the logits of the PyTorch model."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from aqlm_compile import format as fmt
from aqlm_compile.cli import main
from aqlm_compile.errors import FormatError
from aqlm_compile.nn import AqlmLinear

TINY = {"kmeans_iters": 3, "max_rounds": 1}


def _quantize(model_dir, corpus, out, head_config, **kw):
    from aqlm_compile.jobs import quantize_job

    return quantize_job(str(model_dir), str(out), config="2x8g8", head_config=head_config, dataset=str(corpus),
                        preset="tiny", device="cpu", overrides=TINY, **kw)


@pytest.fixture(scope="module")
def head_ckpts(tiny_llama, tiny_corpus, tmp_path_factory):
    """The tiny Llama (tied embedding) with its head at the body's 2x8g8, and at its own 1x8g8."""
    root = tmp_path_factory.mktemp("head")
    for cfg in ("2x8g8", "1x8g8"):
        _quantize(tiny_llama, tiny_corpus, root / cfg, cfg)
    return {cfg: root / cfg for cfg in ("2x8g8", "1x8g8")}


def test_head_is_quantized_and_untied(head_ckpts, tiny_llama):
    fp = json.loads((tiny_llama / "config.json").read_text())
    assert fp["tie_word_embeddings"] is True
    for cfg, ckpt in head_ckpts.items():
        raw = json.loads((ckpt / "config.json").read_text())
        assert raw["tie_word_embeddings"] is False
        assert "lm_head" not in raw["quantization_config"]["linear_weights_not_to_quantize"]
        assert raw["aqlm_compile"]["head_config"] == cfg
        model, config, _ = fmt.load(ckpt)
        assert isinstance(model.lm_head, AqlmLinear) and model.lm_head.config.name == cfg
        assert model.model.embed_tokens.weight is not model.lm_head.codebooks
        report = json.loads((ckpt / "quantize_report.json").read_text())
        assert report["lm_head"]["config"] == cfg and 0 <= report["lm_head"]["relative_error"] < 1
        assert raw["aqlm_compile"]["head_untied"] is True and report["lm_head"]["untied"] is True
    assert "layer_configs" not in json.loads((head_ckpts["2x8g8"] / "config.json").read_text())["aqlm_compile"]
    assert json.loads((head_ckpts["1x8g8"] / "config.json").read_text())["aqlm_compile"]["layer_configs"] == \
        {"lm_head": "1x8g8"}


def test_eval_counts_the_untied_head_once(head_ckpts, tiny_llama, tiny_corpus):
    """`eval`'s whole-model figures: the FP model's parameters (the untied head not counted twice), the file's bytes."""
    from aqlm_compile.jobs import eval_job
    from aqlm_compile.models import load_fp_model

    fp, _ = load_fp_model(tiny_llama)
    result = eval_job(str(head_ckpts["2x8g8"]), dataset=str(tiny_corpus), seqlen=32, windows=2, rtn=False, fp=False)
    assert result["params_all"] == sum(p.numel() for p in fp.parameters())
    assert result["bits_per_param_all"] == pytest.approx(
        (head_ckpts["2x8g8"] / "model.safetensors").stat().st_size * 8 / result["params_all"])
    # `--embedding head`: the artifact's embedding (rows of the quantized head) changes the model
    served = eval_job(str(head_ckpts["2x8g8"]), dataset=str(tiny_corpus), seqlen=32, windows=2, rtn=False, fp=False,
                      embedding="head")
    assert served["embedding"] == "head" and served["ppl"] > 1 and served["ppl"] != result["ppl"]


def test_embedding_keeps_the_fp_rows(head_ckpts, tiny_llama):
    from aqlm_compile.models import load_fp_model

    fp, _ = load_fp_model(tiny_llama)
    model, _, _ = fmt.load(head_ckpts["2x8g8"])
    # stored as fp16, like every unquantized tensor of the checkpoint
    assert torch.equal(model.model.embed_tokens.weight, fp.model.embed_tokens.weight.half().float())


def test_uniform_head_checkpoint_loads_in_transformers(head_ckpts, tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "e2e"))
    from test_hf_compat import compare

    compare(head_ckpts["2x8g8"], tmp_path, 200)


def test_layer_configs_are_validated(head_ckpts, tmp_path):
    import shutil

    ckpt = tmp_path / "bad"
    shutil.copytree(head_ckpts["1x8g8"], ckpt)
    raw = json.loads((ckpt / "config.json").read_text())
    for value, message in (({"lm_head": "2x8g8"}, "lm_head.codes: expected int8 [out, in/8, 2]"),
                           ({"lm_head": "banana"}, "aqlm_compile.layer_configs.lm_head: config 'banana'"),
                           ({"model.nope": "1x8g8"}, "aqlm_compile.layer_configs.model.nope: no such quantized layer"),
                           ([1], "aqlm_compile.layer_configs: expected an object")):
        raw["aqlm_compile"]["layer_configs"] = value
        (ckpt / "config.json").write_text(json.dumps(raw))
        with pytest.raises(FormatError, match=message.replace("[", r"\[").replace(".", r"\.")):
            fmt.validate(ckpt)
    raw["aqlm_compile"].pop("layer_configs")  # the mixed head read as the body's config: a clear shape error
    (ckpt / "config.json").write_text(json.dumps(raw))
    with pytest.raises(FormatError, match="lm_head.codes"):
        fmt.validate(ckpt)


def test_head_config_errors_are_one_line(tiny_llama, tiny_corpus, tmp_path):
    r = CliRunner().invoke(main, ["quantize", str(tiny_llama), "-o", str(tmp_path / "x"), "--head-config", "2x8g7",
                                  "--dataset", str(tiny_corpus), "--preset", "tiny"])
    assert r.exit_code == 2 and "error:" in r.output and "in_group_size 7" in r.output, r.output
    assert not (tmp_path / "x").exists()


def test_resume_keeps_the_head_config(tiny_llama, tiny_corpus, tmp_path):
    """An interrupted run resumes into the same checkpoint; a resume with another head config is refused."""
    out = tmp_path / "ck"
    with pytest.raises(KeyboardInterrupt):
        _quantize(tiny_llama, tiny_corpus, out, "2x8g8", stop_after_block=0)
    with pytest.raises(FormatError, match="head_config"):
        _quantize(tiny_llama, tiny_corpus, out, "1x8g8", resume=True)


def torch_logits(ckpt, steps, change=None):
    """Logits of the PyTorch model (`change`d in place first, if given) for each step of a cached decode."""
    from aqlm_compile.decoder import DecoderWithCache

    model, _, _ = fmt.load(ckpt)
    if change is not None:
        change(model)
    model.config.use_cache = True
    wrap = DecoderWithCache(model).eval()
    past = [torch.zeros(1, wrap.spec.num_kv_heads, 0, wrap.spec.head_dim)] * (2 * wrap.spec.num_layers)
    out, length = [], 0
    for ids in steps:
        with torch.no_grad():
            res = wrap(torch.tensor([ids]), torch.ones(1, length + len(ids), dtype=torch.int64), *past)
        past, length = list(res[1:]), length + len(ids)
        out.append(res[0][0].numpy())
    return out


@pytest.fixture(scope="module")
def head_arts(head_ckpts, tmp_path_factory):
    """x86 artifacts (ONNX + TVM, embedding as stored) of the two head checkpoints, built once for this module."""
    root = tmp_path_factory.mktemp("head-arts")
    arts = {}
    for cfg, ckpt in head_ckpts.items():
        r = CliRunner().invoke(main, ["build", str(ckpt), "--target", "x86", "-o", str(root / cfg),
                                      "--prefill", "fp32"])  # compared with PyTorch to 1e-4
        assert r.exit_code == 0, r.output
        arts[cfg] = root / cfg
    return arts


@pytest.mark.parametrize("cfg", ["2x8g8", "1x8g8"])
def test_artifacts_with_quantized_head_match_torch(cfg, head_ckpts, head_arts):
    from aqlm_compile.runtime.ort import OrtDecoder
    from aqlm_compile.runtime.tvm_runtime import TvmDecoder

    ckpt = head_ckpts[cfg]
    manifest = json.loads((head_arts[cfg] / "manifest.json").read_text())
    vocab, hidden = manifest["layers"]["lm_head"]["out_features"], manifest["layers"]["lm_head"]["in_features"]
    own = None if cfg == "2x8g8" else cfg  # the manifest's aqlm_config is the body's
    assert manifest["layers"]["lm_head"].get("config") == own
    assert f"aqlm_gemv_{vocab}x{hidden}_b1" + (f"_c{own}" if own else "") in manifest["kernels"]
    steps = [[1, 5, 9, 13, 17, 21, 25, 29, 33, 37, 41], [7], [8]]
    want = torch_logits(ckpt, steps)
    for dec in (TvmDecoder(head_arts[cfg], threads=1), OrtDecoder(head_arts[cfg], threads=1)):
        for ids, w in zip(steps, want):
            got = dec.step(np.array(ids))
            assert np.abs(got - w).max() <= 1e-4 * max(1.0, np.abs(w).max()), (type(dec).__name__, ids)


# int8 rows: test_bit_budget.py builds a mixed checkpoint whose recorded embedding is int8 (same checks)
@pytest.mark.parametrize("embedding", ["head", "int4"])
def test_compact_embedding_artifacts_match_torch(embedding, head_ckpts, head_arts, tmp_path):
    """`build --embedding head|int8|int4`: both runtimes equal the PyTorch model with the same embedding
    (`embedding.compact_embedding`), and the embedding's fp16 table is gone from the TVM params and the ONNX model."""
    import onnx

    from aqlm_compile.embedding import compact_embedding
    from aqlm_compile.runtime.ort import OrtDecoder
    from aqlm_compile.runtime.tvm_runtime import TvmDecoder

    ckpt = head_ckpts["2x8g8"]
    r = CliRunner().invoke(main, ["build", str(ckpt), "--target", "x86", "-o", str(tmp_path / "art"),
                                  "--embedding", embedding, "--prefill", "fp32"])  # compared with PyTorch to 1e-4
    assert r.exit_code == 0, r.output
    art = tmp_path / "art"
    assert json.loads((art / "manifest.json").read_text())["embedding"] == embedding
    vocab, hidden = 259, 64
    # the TVM params lose the fp16 table ("int8" adds its int8 rows and fp32 scales back, "int4" its packed nibbles
    # and an fp16 scale per 32 weights)
    saved = (head_arts["2x8g8"] / "model_params.bin").stat().st_size - (art / "model_params.bin").stat().st_size
    added = {"head": 0, "int8": vocab * (hidden + 4), "int4": vocab * (hidden // 2 + hidden // 32 * 2)}[embedding]
    assert saved >= vocab * hidden * 2 - added - 1024, saved
    # the ONNX model has no [vocab, hidden] table, and "head" gathers from the head's own codes (no copy of them)
    model = onnx.load(str(art / "onnx" / "model.onnx"))
    tables = [t for t in model.graph.initializer if list(t.dims) == [vocab, hidden]]
    assert [t.data_type for t in tables] == ([onnx.TensorProto.INT8] if embedding == "int8" else [])
    packed = [t.data_type for t in model.graph.initializer if list(t.dims) == [vocab, hidden // 2]]
    assert packed == ([onnx.TensorProto.UINT8] if embedding == "int4" else []), packed
    codes = [t.name for t in model.graph.initializer if list(t.dims) == [vocab, hidden // 8, 2]]
    assert codes == ["model.lm_head.codes"], codes
    steps = [[1, 5, 9, 13, 17, 21, 25, 29, 33, 37, 41], [7], [8]]
    want = torch_logits(ckpt, steps, lambda m: compact_embedding(m, embedding))
    from aqlm_compile.runtime.torch_runtime import TorchDecoder

    # `generate --runtime torch` on the artifact reads the embedding as its manifest says, like the other two
    for dec in (TvmDecoder(art, threads=1), OrtDecoder(art, threads=1), TorchDecoder(art, threads=1)):
        for ids, w in zip(steps, want):
            got = dec.step(np.array(ids))
            assert np.abs(got - w).max() <= 1e-4 * max(1.0, np.abs(w).max()), (type(dec).__name__, ids)
    # and the embedding changed the model: the stored fp16 rows give other logits
    plain = torch_logits(ckpt, steps[:1])[0]
    assert np.abs(plain - want[0]).max() > 1e-5


def test_embedding_head_needs_a_quantized_head(tiny_llama_ckpt, tmp_path):
    r = CliRunner().invoke(main, ["build", str(tiny_llama_ckpt), "--target", "x86", "-o", str(tmp_path / "x"),
                                  "--embedding", "head", "--no-onnx"])
    assert r.exit_code == 2 and "--embedding head: the lm_head is not an AQLM layer" in r.output, r.output
    assert not (tmp_path / "x").exists()


def test_eval_head_int8_needs_a_dense_head(head_ckpts, tiny_corpus):
    r = CliRunner().invoke(main, ["eval", str(head_ckpts["2x8g8"]), "--dataset", str(tiny_corpus), "--seqlen", "32",
                                  "--windows", "2", "--no-rtn", "--head", "int8"])
    assert r.exit_code == 2 and "--head int8: the lm_head is a AqlmLinear, not a dense linear" in r.output, r.output
    assert "Traceback" not in r.output


def test_synthetic_checkpoint_with_a_quantized_head(tiny_llama, tmp_path):
    """bench.synthetic.make_aqlm_checkpoint(head_config=...): the speed benchmarks' random checkpoint, head included."""
    from aqlm_compile.bench.synthetic import make_aqlm_checkpoint
    from aqlm_compile.models import load_fp_model

    ckpt = make_aqlm_checkpoint(tiny_llama, tmp_path / "syn", "2x8g8", head_config="1x8g8")
    model, _, meta = fmt.load(ckpt)
    assert isinstance(model.lm_head, AqlmLinear) and model.lm_head.config.name == "1x8g8"
    assert meta["head_untied"] is True and not model.config.tie_word_embeddings
    fp, _ = load_fp_model(tiny_llama)
    assert torch.equal(model.model.embed_tokens.weight, fp.model.embed_tokens.weight.half().float())
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[1, 2, 3]])).logits).all()
