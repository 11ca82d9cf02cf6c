"""Checkpoint → `torch.export` program of the whole decoder with an explicit KV cache, then the pass pipeline.

One function serves prefill and decode (relax facts §2): inputs `input_ids [1, S]`, `attention_mask [1, P+S]` and
every layer's past keys and values `[1, H_kv, P, D]` (P = 0 for prefill); outputs the last position's logits
`[1, V]` and every layer's updated keys and values `[1, H_kv, P+S, D]`. S and P are dynamic. Batch is 1.
The attention mask is passed explicitly so transformers never traces its packed-sequence detection (facts §1).
Each `AqlmLinear` is traced as `aqlm.dequantize` + `aten.linear`; `passes.lower_aqlm_linear` then turns each into
one `aqlm.aqlm_gemm` node.
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from pathlib import Path

import torch

from . import format as fmt
from .nn import AqlmLinear


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


def load_for_export(ckpt_dir, dtype=torch.float32, dense_fp16: bool = False):
    """The checkpoint's model with each AqlmLinear traced as dequantize + linear, codebooks/scales in fp16 (their
    checkpoint dtype: what the kernels take). `dense_fp16`: see `keep_dense_fp16`."""
    from aqlm_compile.passes.op import export_forward

    model, aqlm_config, _ = fmt.load(ckpt_dir, dtype=dtype)
    model.config.use_cache = True
    for module in model.modules():
        if isinstance(module, AqlmLinear):
            module.codebooks.data = module.codebooks.data.half()
            module.scales.data = module.scales.data.half()
            module.forward = types.MethodType(export_forward, module)
    if dense_fp16:
        keep_dense_fp16(model)
    return model, aqlm_config


def _embedding_fp16(self, ids):
    return torch.nn.functional.embedding(ids, self.weight, self.padding_idx).float()


def _linear_fp16(self, x):
    return torch.nn.functional.linear(x, self.weight.float(), self.bias)


def keep_dense_fp16(model) -> None:
    """Store the embedding and the dense linears (the lm_head) as fp16 — their dtype in an AQLM checkpoint — and
    compute in fp32: the graph reads `embedding(W16).float()` and `linear(x, W16.float())`, so the values are the
    checkpoint's exactly and the runtime can stream half the bytes (SmolLM2's tied 49152×576 lm_head is the
    largest tensor of the model). A tied weight stays one parameter."""
    halves: dict[int, torch.nn.Parameter] = {}
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding) or type(module) is torch.nn.Linear:
            w = module.weight
            if id(w) not in halves:
                halves[id(w)] = torch.nn.Parameter(w.detach().half(), requires_grad=False)
            module.weight = halves[id(w)]
            module.forward = types.MethodType(
                _embedding_fp16 if isinstance(module, torch.nn.Embedding) else _linear_fp16, module)


def example_inputs(spec: DecoderSpec, seq: int = 3, past: int = 2, dtype=torch.float32):
    ids = torch.randint(0, spec.vocab_size, (1, seq))
    mask = torch.ones(1, past + seq, dtype=torch.int64)
    kv = [torch.randn(1, spec.num_kv_heads, past, spec.head_dim, dtype=dtype) for _ in range(2 * spec.num_layers)]
    return (ids, mask, *kv)


def export_decoder(model, tokens: int | None = None):
    """torch.export of `DecoderWithCache(model)` with a dynamic past length and a dynamic token count — or a fixed
    one (`tokens`, e.g. 1 for a decode-step function whose layers can use the GEMV kernels)."""
    wrapper = DecoderWithCache(model).eval()
    spec = wrapper.spec
    dyn = torch.export.Dim.DYNAMIC
    dynamic = ({1: dyn} if tokens is None else {}, {1: dyn},
               tuple({2: dyn} for _ in range(2 * spec.num_layers)))
    with torch.no_grad():
        ep = torch.export.export(wrapper, example_inputs(spec, seq=tokens or 3), dynamic_shapes=dynamic, strict=False)
    return ep, spec


def export_checkpoint(ckpt_dir, dump_ir: str | Path | None = None, supports=None, fuse: bool = True,
                      tokens: int | None = None, dense_fp16: bool = False):
    """Checkpoint → lowered ExportedProgram (+ the pipeline's report and the DecoderSpec)."""
    from aqlm_compile.passes.pipeline import run_pipeline

    model, aqlm_config = load_for_export(ckpt_dir, dense_fp16=dense_fp16)
    ep, spec = export_decoder(model, tokens)
    report = run_pipeline(ep, dump_ir=dump_ir, supports=supports, name_prefix="model.", fuse=fuse)
    return ep, spec, report
