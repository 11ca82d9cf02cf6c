"""The llama.cpp peer: HF -> GGUF with llama.cpp's own converter, and back into HF with identical logits.

CI has PyPI but no built llama.cpp binaries, so the converter round trip runs for real (it needs only the
sdist's Python), and the quantize/imatrix/bench test runs only where `tools()` finds the built binaries.
"""

import shutil

import pytest
import torch

from aqlm_compile.bench import llamacpp
from aqlm_compile.errors import FormatError
from aqlm_compile.models import load_fp_model


@pytest.fixture(scope="module")
def llama_source():
    try:
        return llamacpp.source_dir()
    except llamacpp.ToolMissing as exc:
        pytest.skip(f"llama.cpp sdist unavailable: {exc.reason}")


@pytest.fixture(scope="module")
def spm_llama(tiny_llama, tmp_path_factory):
    """tiny_llama (same weights and config) plus a sentencepiece `tokenizer.model`.

    The converter recognises a BPE tokenizer only by hashing its pre-tokenizer's output against a list of
    known models, so it refuses the tiny model's freshly trained BPE ("BPE pre-tokenizer was not recognized").
    With a tokenizer.model it takes the sentencepiece path, which has no such check and pads the vocabulary
    to config.vocab_size. Token ids, not text, are compared below, so the tokenizer's content is irrelevant.
    It has no byte-fallback pieces (they alone would overflow the tiny vocabulary), so llama.cpp can tokenize
    only the characters it was trained on: see `calib` below.
    """
    import sentencepiece as spm
    from tiny_models import corpus_text

    out = tmp_path_factory.mktemp("spm") / "llama"
    shutil.copytree(tiny_llama, out)
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus_text().splitlines()),
                                   model_prefix=str(out / "tokenizer"), vocab_size=64, model_type="bpe",
                                   character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                   hard_vocab_limit=False, minloglevel=2)
    (out / "tokenizer.vocab").unlink()
    return out


@pytest.fixture(scope="module")
def f32_gguf(llama_source, spm_llama, tmp_path_factory):
    return llamacpp.convert(spm_llama, tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf", "f32")


def _ids(vocab_size):
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, vocab_size, (2, 40), generator=g)


@torch.no_grad()
def test_f32_gguf_round_trip_reproduces_logits(f32_gguf, tiny_llama):
    import gguf

    # Tied embeddings: no `output` tensor; 2 blocks x 7 linears + token_embd, all F32.
    assert llamacpp.tensor_types(f32_gguf) == {"F32": 15}
    fp, _ = load_fp_model(tiny_llama)
    # The converter really permutes k (with n_kv_head=2 != n_head=4), so equal logits below test the inverse.
    k_raw = next(t for t in gguf.GGUFReader(str(f32_gguf)).tensors if t.name == "blk.0.attn_k.weight")
    assert not torch.equal(torch.from_numpy(k_raw.data.copy()), fp.model.layers[0].self_attn.k_proj.weight)
    back = llamacpp.load_gguf_as_hf(f32_gguf, tiny_llama)
    assert torch.equal(back.model.layers[0].self_attn.k_proj.weight, fp.model.layers[0].self_attn.k_proj.weight)
    ids = _ids(fp.config.vocab_size)
    diff = (back(input_ids=ids).logits - fp(input_ids=ids).logits).abs().max().item()
    assert diff <= 1e-5, diff


def test_load_refuses_a_mismatched_hf_dir(f32_gguf, tiny_mistral):
    # Same shapes, but the Mistral tiny model is untied: the GGUF has no `output` tensor for its lm_head.
    with pytest.raises(FormatError, match="lm_head.weight"):
        llamacpp.load_gguf_as_hf(f32_gguf, tiny_mistral)


def test_tools_missing_says_how_to_build(tmp_path, monkeypatch):
    monkeypatch.setattr(llamacpp, "_version_dir", lambda: tmp_path / "none")
    with pytest.raises(llamacpp.ToolMissing, match="--build-llamacpp"):
        llamacpp.tools()
    monkeypatch.setattr(llamacpp.shutil, "which", lambda name: None)
    with pytest.raises(llamacpp.ToolMissing, match="cmake not found"):
        llamacpp.tools(build=True)


@pytest.fixture(scope="module")
def built_tools():
    try:
        return llamacpp.tools()
    except llamacpp.ToolMissing as exc:
        pytest.skip(exc.reason)


@torch.no_grad()
def test_quantize_imatrix_bench(built_tools, f32_gguf, tiny_llama, tmp_path):
    from tiny_models import corpus_text

    # One line: "\n" is not a piece of the tiny sentencepiece vocabulary, and llama.cpp aborts on a character
    # it can neither tokenize nor byte-fall-back (real models have byte pieces).
    calib = tmp_path / "calib.txt"
    calib.write_text(corpus_text().replace("\n", " "))
    imat = llamacpp.imatrix(built_tools, f32_gguf, calib, tmp_path / "imatrix.gguf", chunks=4, ctx=64, threads=2)
    q8 = llamacpp.quantize(built_tools, f32_gguf, tmp_path / "q8.gguf", "Q8_0", imatrix=imat, threads=2)
    assert llamacpp.tensor_types(q8) == {"Q8_0": 15}
    assert 8 < llamacpp.weight_bits(q8)["bits_per_param"] < 9  # 8-bit codes + an fp16 scale per 32
    fp, _ = load_fp_model(tiny_llama)
    ids = _ids(fp.config.vocab_size)
    ref = fp(input_ids=ids).logits
    diff = (llamacpp.load_gguf_as_hf(q8, tiny_llama)(input_ids=ids).logits - ref).abs().max().item()
    assert diff < 0.05 * ref.abs().max().item(), diff

    result = llamacpp.bench(built_tools, q8, threads=2, prompts=(32,), gen=16, reps=1)
    assert result["prefill_tokens_per_s"]["32"] > 0 and result["decode_tokens_per_s"] > 0
    # llama-bench's own peak (tens of MiB for this model), not this torch-sized process's RSS carried over by exec.
    assert 1 << 20 < result["peak_rss_bytes"] < 200 << 20, result["peak_rss_bytes"]
    assert "-p 32 -n 16" in result["command"]
    decode_only = llamacpp.bench(built_tools, q8, threads=2, prompts=(), gen=16, reps=1)
    assert decode_only["prefill_tokens_per_s"] == {} and decode_only["decode_tokens_per_s"] > 0


def test_build_flags_leave_amx_out_where_the_cpu_advertises_it():
    from aqlm_compile.bench.llamacpp import CMAKE_FLAGS, build_flags

    zen4 = {"sse4_2", "avx", "avx2", "fma", "f16c", "bmi2", "avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw",
            "avx512vbmi", "avx512_vnni", "avx512_bf16"}
    assert build_flags(zen4) == (CMAKE_FLAGS, "native")  # no AMX: the native build, as documented
    flags, variant = build_flags(zen4 | {"amx_tile", "amx_int8", "amx_bf16", "avx512_fp16"})
    assert variant == "noamx" and "-DGGML_NATIVE=OFF" in flags and "-DGGML_NATIVE=ON" not in flags
    for on in ("GGML_AVX512", "GGML_AVX512_VBMI", "GGML_AVX512_VNNI", "GGML_AVX512_BF16", "GGML_AVX2", "GGML_FMA"):
        assert f"-D{on}=ON" in flags, on
    for off in ("GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16", "GGML_AVX_VNNI"):
        assert f"-D{off}=OFF" in flags, off
    assert set(CMAKE_FLAGS[1:]) <= set(flags)  # curl/openssl/tests off, Release
    assert build_flags(zen4 | {"amx_tile"}, allow_amx=True) == (CMAKE_FLAGS, "native")
    # AVX-512 only with every part GGML_AVX512 compiles for
    assert "-DGGML_AVX512=OFF" in build_flags({"avx512f", "amx_tile"})[0]
