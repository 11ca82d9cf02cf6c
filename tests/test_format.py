import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from aqlm_compile import format as fmt
from aqlm_compile.config import AqlmConfig
from aqlm_compile.errors import FormatError
from aqlm_compile.models import block_linears, decoder_layers, load_fp_model
from aqlm_compile.nn import AqlmLinear, pack_codes, unpack_codes


def test_pack_unpack_signed():
    codes = torch.tensor([0, 1, 127, 128, 200, 255])
    packed = pack_codes(codes, 8)
    assert packed.dtype == torch.int8
    assert packed.tolist() == [0, 1, 127, -128, -56, -1]
    assert unpack_codes(packed, 8).tolist() == codes.tolist()
    wide = torch.tensor([0, 4095, 2048, 65535, 40000])
    assert pack_codes(wide[:3], 12).dtype == torch.int16
    assert unpack_codes(pack_codes(wide[:3], 12), 12).tolist() == wide[:3].tolist()
    assert unpack_codes(pack_codes(wide, 16), 16).tolist() == wide.tolist()


def quantize_randomly(model_dir, cfg="2x8g8", seed=0):
    model, _ = load_fp_model(model_dir)
    config = AqlmConfig.parse(cfg)
    gen = torch.Generator().manual_seed(seed)
    _, layers = decoder_layers(model)
    for block in layers:
        for name, lin in block_linears(block).items():
            codes = torch.randint(0, config.codebook_size, (lin.out_features, lin.in_features // config.in_group_size,
                                                            config.num_codebooks), generator=gen)
            cb = torch.randn(config.num_codebooks, config.codebook_size, 1, config.in_group_size, generator=gen) * 0.1
            fmt.replace_module(block, name, AqlmLinear.from_parts(codes, cb.half().float(),
                                                                  torch.rand(lin.out_features, generator=gen).half().float() + 0.5,
                                                                  config, None if lin.bias is None else lin.bias.detach()))
    return model, config


@pytest.mark.parametrize("cfg", ["2x8g8", "1x16g8"])
def test_round_trip(tiny_llama, tmp_path, cfg):
    model, config = quantize_randomly(tiny_llama, cfg)
    for m in model.modules():  # what we save is fp16; make the in-memory model the same
        for p in m.parameters(recurse=False):
            if p.is_floating_point():
                p.data = p.data.half().float()
    out = fmt.save(tmp_path / "ckpt", model, config, source_dir=tiny_llama)
    assert (out / "tokenizer.json").exists()
    loaded, config2, meta = fmt.load(out)
    assert config2 == config and meta["config"] == cfg
    ids = torch.randint(0, 200, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=1e-5)
    tensors = load_file(str(out / "model.safetensors"))
    codes = tensors["model.layers.0.self_attn.q_proj.codes"]
    assert codes.dtype == (torch.int8 if cfg == "2x8g8" else torch.int16)
    assert list(codes.shape) == [64, 64 // 8, config.num_codebooks]
    assert tensors["model.layers.0.self_attn.q_proj.codebooks"].dtype == torch.float16
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "aqlm" and qc["num_codebooks"] == config.num_codebooks
    assert "lm_head" in qc["linear_weights_not_to_quantize"] and "model.embed_tokens" in qc["linear_weights_not_to_quantize"]


@pytest.fixture
def saved(tiny_llama, tmp_path):
    model, config = quantize_randomly(tiny_llama)
    return fmt.save(tmp_path / "ckpt", model, config, source_dir=tiny_llama)


def _rewrite(path, key, value):
    tensors = load_file(str(path / "model.safetensors"))
    tensors[key] = value
    save_file(tensors, str(path / "model.safetensors"))


def test_validate_wrong_code_dtype(saved):
    key = "model.layers.1.mlp.up_proj.codes"
    t = load_file(str(saved / "model.safetensors"))[key]
    _rewrite(saved, key, t.to(torch.int16))
    with pytest.raises(FormatError, match=r"model.layers.1.mlp.up_proj.codes: expected int8 .* found int16 \[128, 8, 2\]"):
        fmt.validate(saved)


def test_validate_wrong_codebook_shape(saved):
    _rewrite(saved, "model.layers.0.self_attn.k_proj.codebooks", torch.zeros(2, 128, 1, 8, dtype=torch.float16))
    with pytest.raises(FormatError, match=r"k_proj.codebooks: expected float \[2, 256, 1, 8\]"):
        fmt.validate(saved)


def test_load_wrong_codes_shape(saved):
    _rewrite(saved, "model.layers.0.self_attn.o_proj.codes", torch.zeros(64, 4, 2, dtype=torch.int8))
    _rewrite(saved, "model.layers.0.self_attn.o_proj.scales", torch.ones(64, 1, 1, 1, dtype=torch.float16))
    with pytest.raises(FormatError, match=r"o_proj.codes: expected \[64, 8, 2\]"):
        fmt.load(saved)


def test_validate_bad_config(saved):
    cfg = json.loads((saved / "config.json").read_text())
    del cfg["quantization_config"]["in_group_size"]
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match="quantization_config.in_group_size: missing"):
        fmt.validate(saved)
    (saved / "config.json").write_text("{not json")
    with pytest.raises(FormatError, match="config.json: not valid JSON"):
        fmt.validate(saved)


def test_validate_missing_and_corrupt_weights(saved):
    (saved / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(FormatError, match="model.safetensors: not a readable safetensors file"):
        fmt.validate(saved)
    (saved / "model.safetensors").unlink()
    with pytest.raises(FormatError, match="model.safetensors: missing"):
        fmt.validate(saved)


def test_validate_nan_scales(saved):
    _rewrite(saved, "model.layers.0.mlp.down_proj.scales", torch.full((64, 1, 1, 1), float("nan"), dtype=torch.float16))
    with pytest.raises(FormatError, match="down_proj.scales: contains NaN"):
        fmt.validate(saved)


def _edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("changes,message", [
    ({"vocab_size": 10 ** 9}, r"vocab_size: expected an integer in 1..4194304, found '1000000000'"),
    ({"hidden_size": "64"}, r"hidden_size: expected an integer in 1..131072"),
    ({"num_hidden_layers": 100000}, r"num_hidden_layers: expected an integer in 1..1024"),
    ({"num_hidden_layers": 7}, r"num_hidden_layers: 7, but model.safetensors holds blocks 0..1"),
    ({"vocab_size": 300}, r"vocab_size 300 x hidden_size .* does not match model.embed_tokens.weight"),
    ({"model_type": "no-such-model"}, r"config.json: not a usable model config"),
])
def test_absurd_config_sizes_are_refused_before_any_allocation(saved, changes, message):
    """A config.json with a vocabulary of 10⁹ used to reach the allocator (a traceback, or the OOM killer): sizes
    are checked against limits and the tensors first, and the model is built on the meta device before for real."""
    _edit_config(saved, **changes)
    with pytest.raises(FormatError, match=message):
        fmt.load(saved)


def test_corrupt_tokenizer_is_one_clear_line(saved):
    from click.testing import CliRunner

    from aqlm_compile.cli import main

    (saved / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    with pytest.raises(FormatError, match=r"tokenizer.json: not valid JSON"):
        fmt.validate(saved)
    corpus = saved.parent / "corpus.txt"
    corpus.write_text("a few words of text.\n" * 400)
    r = CliRunner().invoke(main, ["eval", str(saved), "--no-rtn", "--dataset", str(corpus)])
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert r.exit_code == 2 and len(lines) == 1 and "tokenizer.json: not valid JSON" in lines[0], r.output


def test_source_model_is_relative_not_an_absolute_path(saved, tiny_llama, tmp_path):
    """The quantizing machine's absolute paths stay out of a shared checkpoint; the FP model is found from the
    relative path, or by its name beside the checkpoint or in the model cache when the checkpoint has moved."""
    import shutil

    recorded = json.loads((saved / "config.json").read_text())["aqlm_compile"]["source_model"]
    assert not recorded.startswith("/") and recorded.endswith(tiny_llama.name)
    from aqlm_compile.models import find_source_model
    assert find_source_model(recorded, saved).resolve() == tiny_llama.resolve()
    moved = tmp_path / "elsewhere" / "ckpt"
    shutil.copytree(saved, moved)
    assert find_source_model(recorded, moved) is None  # neither at the relative path nor beside it
    shutil.copytree(tiny_llama, moved.parent / tiny_llama.name)
    assert find_source_model(recorded, moved) == moved.parent / tiny_llama.name
    for bad in ("", None, "..", 5):
        assert find_source_model(bad, moved) is None


def test_load_never_allocates_the_dense_linears(saved, monkeypatch):
    """`format.load` builds the decoder layers on the meta device and assigns the checkpoint's tensors (issue 16:
    a 7B checkpoint must not need the 27 GB of its dense fp32 linears to load)."""
    made = []
    init = torch.nn.Linear.__init__

    def recording_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(torch.nn.Linear, "__init__", recording_init)
    embeddings = []
    embedding_init = torch.nn.Embedding.__init__

    def recording_embedding(self, *args, **kwargs):
        embedding_init(self, *args, **kwargs)
        embeddings.append(self.weight.is_meta)

    monkeypatch.setattr(torch.nn.Embedding, "__init__", recording_embedding)
    model, _, _ = fmt.load(saved)
    assert embeddings and all(embeddings)  # nor a random embedding table, overwritten right after
    _, layers = decoder_layers(model)
    quantized = {(m.out_features, m.in_features) for layer in layers for m in layer.modules() if isinstance(m, AqlmLinear)}
    assert quantized
    dense = [m for m in made if (m.out_features, m.in_features) in quantized and not m.weight.is_meta]
    assert dense == []
    assert not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
