"""Tiny random models of several architectures, with a small BPE tokenizer trained on the fly (no network)."""

from __future__ import annotations

from pathlib import Path

TEXT = """The quick brown fox jumps over the lazy dog. A stitch in time saves nine.
All that glitters is not gold. The early bird catches the worm. Actions speak louder than words.
Every cloud has a silver lining. Fortune favours the bold. Knowledge is power. Time is money.
Where there is a will there is a way. Practice makes perfect. Better late than never.
"""


def corpus_text(lines: int = 400) -> str:
    import random

    rng = random.Random(0)
    sentences = [s.strip() + "." for s in TEXT.replace("\n", " ").split(".") if s.strip()]
    return "\n".join(" ".join(rng.choice(sentences) for _ in range(3)) for _ in range(lines))


def make_tokenizer(out_dir: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=256, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([corpus_text()], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(out_dir)
    return fast


ARCHS = {
    "llama": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2": dict(model_type="qwen2", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
    "mistral": dict(model_type="mistral", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
}


def make_model(out_dir: Path, arch: str = "llama", seed: int = 0, **overrides) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(out_dir)
    spec = {**ARCHS[arch], **overrides}
    model_type = spec.pop("model_type")
    config = AutoConfig.for_model(model_type, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                  eos_token_id=tok.eos_token_id, max_position_embeddings=256, **spec)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out_dir)
    return out_dir


def write_corpus(path: Path) -> Path:
    path.write_text(corpus_text())
    return path


def tamper(path: Path, offset: int = 100) -> None:
    """Overwrite a few bytes of a file in place (to check that sha256 verification catches it)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        old = f.read(4)
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in old))


def greedy_tokens(where, runtime: str, n: int = 8) -> list[int]:
    """`aqlm-compile generate --json` through the CLI (in process): the greedy token ids."""
    import json

    from click.testing import CliRunner

    from aqlm_compile.cli import main

    r = CliRunner().invoke(main, ["generate", str(where), "The quick brown", "--max-new-tokens", str(n), "--json",
                                  "--runtime", runtime])
    assert r.exit_code == 0, r.output
    return json.loads(r.output.strip().splitlines()[-1])["new_tokens"]


def torch_prefill_logits(ckpt, ids):
    """The PyTorch AQLM model's last-position logits for a prompt from an empty cache (the reference for a compiled
    prefill), as numpy."""
    import torch

    from aqlm_compile import format as fmt
    from aqlm_compile.decoder import DecoderWithCache

    model, _, _ = fmt.load(ckpt)
    model.config.use_cache = True
    wrapper = DecoderWithCache(model).eval()
    spec = wrapper.spec
    ids = torch.as_tensor(ids).reshape(1, -1)
    with torch.no_grad():
        return wrapper(ids, torch.ones(1, ids.shape[1], dtype=torch.int64),
                       *[torch.zeros(1, spec.num_kv_heads, 0, spec.head_dim)] * (2 * spec.num_layers))[0][0].numpy()
