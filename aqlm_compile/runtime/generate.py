"""One sampling loop for every runtime (ORT, TVM, torch). Needs numpy and tokenizers only.

A runtime is a `Decoder`: `vocab_size`, `eos_token_ids`, `bos_token_id`, `reset()`, and `step(ids) -> logits`
(feeds token ids [S] after everything fed since the last reset, keeps the KV cache, returns the logits of the last
position as float32 [vocab]).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Protocol

import numpy as np

from ..errors import ConfigError, FormatError


class Decoder(Protocol):
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None

    def reset(self) -> None: ...

    def step(self, ids: np.ndarray) -> np.ndarray: ...


def load_tokenizer(folder: Path):
    from tokenizers import Tokenizer

    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        raise FormatError(f"{path}: missing (the artifact's tokenizer)")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # noqa: BLE001 - tokenizers raises its own exception type
        raise FormatError(f"{path}: not a readable tokenizer ({str(exc).splitlines()[0][:200]})") from None


def encode_prompt(tokenizer, prompt: str, bos_token_id: int | None, add_bos: bool) -> list[int]:
    ids = tokenizer.encode(prompt, add_special_tokens=False).ids
    if add_bos and bos_token_id is not None and (not ids or ids[0] != bos_token_id):
        ids = [bos_token_id] + ids
    if not ids:
        raise ConfigError("prompt: empty after tokenization")
    return ids


def check_token_ids(ids, vocab_size: int) -> np.ndarray:
    """Token ids reach the runtime only if they index the embedding (a bad id must never reach a kernel)."""
    arr = np.asarray(ids, dtype=np.int64).reshape(-1)
    bad = arr[(arr < 0) | (arr >= vocab_size)]
    if bad.size:
        raise ConfigError(f"token ids: {bad[:5].tolist()} outside the vocabulary 0..{vocab_size - 1}")
    return arr


def sample(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    if temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p)
        keep = order[: int(np.searchsorted(np.cumsum(p[order]), top_p)) + 1]
        mask = np.zeros_like(p)
        mask[keep] = p[keep]
        p = mask / mask.sum()
    return int(rng.choice(len(p), p=p))


def generate(decoder: Decoder, tokenizer, prompt: str, max_new_tokens: int = 32, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, add_bos: bool = True, stop_at_eos: bool = True,
             on_token=None) -> dict:
    """Greedy (temperature 0) or sampled generation. Returns prompt_tokens, new_tokens, text, tokens_per_s
    (decode steps per second after the prompt), prefill_s."""
    if max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens {max_new_tokens}: expected ≥ 1")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ConfigError(f"temperature {temperature} / top_p {top_p}: expected temperature ≥ 0 and 0 < top_p ≤ 1")
    prompt_ids = encode_prompt(tokenizer, prompt, decoder.bos_token_id, add_bos)
    ids = check_token_ids(prompt_ids, decoder.vocab_size)
    rng = np.random.default_rng(seed)
    decoder.reset()
    t0 = time.perf_counter()
    logits = decoder.step(ids)
    prefill_s = time.perf_counter() - t0
    new: list[int] = []
    t1 = time.perf_counter()
    while True:
        token = sample(logits, temperature, top_p, rng)
        new.append(token)
        if on_token is not None:
            on_token(token)
        if len(new) >= max_new_tokens or (stop_at_eos and token in decoder.eos_token_ids):
            break
        logits = decoder.step(check_token_ids([token], decoder.vocab_size))
    decode_s = time.perf_counter() - t1
    steps = len(new) - 1  # decode calls after the prefill
    return {"prompt_tokens": [int(i) for i in prompt_ids], "new_tokens": new,
            "text": tokenizer.decode(new, skip_special_tokens=True),
            "tokens_per_s": steps / decode_s if steps and decode_s > 0 else None, "prefill_s": prefill_s,
            "prompt_tokens_per_s": len(prompt_ids) / prefill_s if prefill_s > 0 else None}


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise FormatError(f"{path}: not readable JSON ({exc})") from None
