"""The decoder with an explicit KV cache: `DecoderWithCache(model)(input_ids, attention_mask, *past) -> (last
logits, *present)`, and its `DecoderSpec` (layers, KV heads, head size, vocabulary, BOS/EOS).

Core: the exporter traces it (aqlm_compile/export.py) and the PyTorch reference runtime runs it
(runtime/torch_runtime.py), so both compute the same thing. One function serves prefill and decode
(docs/tvm-and-ort-notes.md N13); the attention mask is passed explicitly so transformers never traces its
packed-sequence detection (N12).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DecoderSpec:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]

    def kv_names(self) -> list[str]:
        return [f"past_{kind}_{i}" for i in range(self.num_layers) for kind in ("key", "value")]

    def present_names(self) -> list[str]:
        return [f"present_{kind}_{i}" for i in range(self.num_layers) for kind in ("key", "value")]

    def to_json(self) -> dict:
        return {"num_layers": self.num_layers, "num_kv_heads": self.num_kv_heads, "head_dim": self.head_dim,
                "vocab_size": self.vocab_size, "bos_token_id": self.bos_token_id,
                "eos_token_ids": list(self.eos_token_ids)}


def decoder_spec(model) -> DecoderSpec:
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    eos = cfg.eos_token_id if isinstance(cfg.eos_token_id, (list, tuple)) else [cfg.eos_token_id]
    gen = getattr(model, "generation_config", None)
    if gen is not None and gen.eos_token_id is not None:
        eos = list(eos) + list(gen.eos_token_id if isinstance(gen.eos_token_id, (list, tuple)) else [gen.eos_token_id])
    return DecoderSpec(cfg.num_hidden_layers, getattr(cfg, "num_key_value_heads", cfg.num_attention_heads), head_dim,
                       cfg.vocab_size, cfg.bos_token_id, tuple(sorted({int(e) for e in eos if e is not None})))


class DecoderWithCache(torch.nn.Module):
    """(input_ids, attention_mask, *past) -> (last logits, *present); see the module docstring."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.spec = decoder_spec(model)

    def forward(self, input_ids, attention_mask, *past):
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for t in past[1:]:  # one past length for every layer: the exporter (and Relax) then use one symbol for it
            torch._check(t.shape[2] == past[0].shape[2])
        for i, layer in enumerate(cache.layers):
            k, v = past[2 * i], past[2 * i + 1]
            layer.lazy_initialization(k, v)
            layer.keys, layer.values = k, v
        # The last position by a non-negative index: negative slices of a symbolic dimension came out of the Relax
        # importer as garbage (NaN logits), and logits_to_keep=1 slices [-1:].
        if getattr(self.model.config, "final_logit_softcapping", None):
            raise NotImplementedError("final_logit_softcapping (Gemma 2) is not exported yet")
        hidden = self.model.model(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache,
                                  use_cache=True)
        last = hidden.last_hidden_state.narrow(1, input_ids.shape[1] - 1, 1)
        logits = self.model.lm_head(last)[:, 0, :]
        out = hidden
        present = []
        for layer in out.past_key_values.layers:
            present += [layer.keys, layer.values]
        return (logits, *present)
