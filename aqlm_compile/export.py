"""A loaded checkpoint → `torch.export` program of the whole decoder with an explicit KV cache (core: no passes).

One function serves prefill and decode (docs/tvm-and-ort-notes.md N13): inputs `input_ids [1, S]`,
`attention_mask [1, P+S]` and every layer's past keys and values `[1, H_kv, P, D]` (P = 0 for prefill); outputs the last position's logits
`[1, V]` and every layer's updated keys and values `[1, H_kv, P+S, D]`. S and P are dynamic. Batch is 1.
The attention mask is passed explicitly so transformers never traces its packed-sequence detection
(N12; aqlm_compile/decoder.py). Each `AqlmLinear` is traced as `aqlm.dequantize` + `aten.linear` (the op dialect,
aqlm_compile/ops.py); the build plan (targets/plan.py) then runs the pass pipeline, whose `lower_aqlm_linear`
turns each into one `aqlm.aqlm_gemm` node.
"""

from __future__ import annotations

import contextlib
import types

import torch

from . import format as fmt
from .decoder import DecoderSpec, DecoderWithCache, decoder_spec  # noqa: F401  (re-exported)
from .embedding import EMBEDDINGS, _embedding_rows_int8, compact_embedding, rows_int8  # noqa: F401  (re-exported)
from .nn import AqlmLinear
from .ops import export_forward


def prepare_for_export(model):
    """`model` (a loaded checkpoint) made ready to trace, in place: each AqlmLinear traced as dequantize + linear,
    codebooks/scales in fp16 (their checkpoint dtype: what the kernels take); the KV cache on."""
    model.config.use_cache = True
    for module in model.modules():
        if isinstance(module, AqlmLinear):
            module.codebooks.data = module.codebooks.data.half()
            module.scales.data = module.scales.data.half()
            module.forward = types.MethodType(export_forward, module)
    return model


def load_for_export(ckpt_dir, dtype=torch.float32, dense_fp16: bool = False):
    """`fmt.load` + `prepare_for_export` (+ `keep_dense_fp16` with `dense_fp16`): (model, AqlmConfig). The build
    plan loads once and calls `prepare_for_export` itself; this is for tests and tools."""
    model, aqlm_config, _ = fmt.load(ckpt_dir, dtype=dtype)
    prepare_for_export(model)
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
            w = getattr(module, "weight", None)
            if w is None:  # a compact embedding (`compact_embedding`) has no dense weight left
                continue
            if id(w) not in halves:
                halves[id(w)] = torch.nn.Parameter(w.detach().half(), requires_grad=False)
            module.weight = halves[id(w)]
            module.forward = types.MethodType(
                _embedding_fp16 if isinstance(module, torch.nn.Embedding) else _linear_fp16, module)


def _linear_f16_op(self, x):
    y = torch.ops.aqlm.linear_f16(x, self.weight)
    return y if self.bias is None else y + self.bias.float()


@contextlib.contextmanager
def dense_ops_for_onnx(model):
    """While the ONNX route exports: every dense linear that `keep_dense_fp16` left fp16 (the lm_head) computes
    through `aqlm.linear_f16`, one `aqlm.DenseMatMul` node that the op library runs with kernels/dense.py on the
    fp16 rows. Traced as `linear(x, W16.float())`, it would be a Cast + MatMul that ONNX Runtime constant-folds into
    an fp32 copy of the weight at session creation: twice the bytes streamed per token, on ORT's own one-thread
    pool (docs/tvm-and-ort-notes.md N26). An int8 head is one op already (`keep_head_int8`). The Relax route keeps
    `linear` (its converter matches the fp16 weight), so the forwards are restored afterwards."""
    swapped = [m for m in model.modules()
               if type(m) is torch.nn.Linear and getattr(m.forward, "__func__", None) is _linear_fp16]
    for module in swapped:
        module.forward = types.MethodType(_linear_f16_op, module)
    try:
        yield model
    finally:
        for module in swapped:
            module.forward = types.MethodType(_linear_fp16, module)


# rotary types whose inverse frequencies do not change with the sequence length (a cos/sin table computed once holds)
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
# attention classes whose forward is exactly: q/k/v projections, half-split rotary (HF `rotate_half`) at every
# layer, KV-cache append, causal (grouped-query) softmax attention with `scaling`, o projection. Named, not
# recognised by their attributes: look-alikes differ (SmolLM3 skips rotary in some layers, Cohere and Helium
# interleave it, OLMo clamps q/k/v, BitNet norms before o_proj).
GQA_ATTENTION_CLASSES = ("LlamaAttention", "MistralAttention", "MixtralAttention", "Qwen2Attention")


def gqa_eligible(attn, config) -> str | None:
    """None when the attention module `attn` computes what `aqlm.gqa_attention` does (a class of
    `GQA_ATTENTION_CLASSES`, a static rotary table, no sliding window, a head size ORT's kernel takes); else why
    not."""
    name = type(attn).__name__
    if name not in GQA_ATTENTION_CLASSES:
        return f"attention class {name}"
    for field in ("q_norm", "k_norm"):  # a subclass may add them
        if getattr(attn, field, None) is not None:
            return f"has {field}"
    if getattr(config, "attn_logit_softcapping", None):
        return "attention logit softcapping"
    # a sliding window: HF's cache then keeps only the window's last keys (DynamicSlidingWindowLayer), which the
    # op's present KV (all positions) is not
    window = attn.sliding_window if hasattr(attn, "sliding_window") else getattr(config, "sliding_window", None)
    if window:
        return f"sliding window {window}"
    rope = getattr(config, "rope_parameters", None) or {}
    if any(isinstance(v, dict) for v in rope.values()):
        return "rotary parameters per layer type"
    if rope.get("rope_type", "default") not in STATIC_ROPE_TYPES:
        return f"rope type {rope.get('rope_type')!r}"
    if rope.get("partial_rotary_factor", 1.0) != 1.0 or getattr(config, "partial_rotary_factor", 1.0) != 1.0:
        return "partial rotary"
    # ORT's GroupQueryAttention with a rotary table checks this when a node runs, not when the session loads
    if attn.head_dim % 16:
        return f"head_dim {attn.head_dim} (ORT's GroupQueryAttention needs a multiple of 16)"
    return None


def _attention_gqa(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None,
                   **kwargs):
    q, k, v = self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)
    layer = past_key_values.layers[self.layer_idx]
    gqa = self._aqlm_gqa
    tables = gqa["tables"]  # read from the module when called: the trace swaps its buffers for graph inputs
    out, layer.keys, layer.values = torch.ops.aqlm.gqa_attention(
        q, k, v, layer.keys, layer.values, gqa["state"]["mask"], tables.aqlm_rope_cos, tables.aqlm_rope_sin,
        gqa["num_heads"], gqa["kv_num_heads"], gqa["scale"])
    return self.o_proj(out), None


def gqa_max_positions(model) -> int | None:
    """The positions the ONNX route's rotary table covers (its GroupQueryAttention refuses a longer sequence), or
    None when `attention_ops_for_onnx` would leave every layer traced."""
    inner = getattr(model, "model", None)
    if getattr(getattr(inner, "rotary_emb", None), "inv_freq", None) is None or not hasattr(inner, "layers"):
        return None
    if not any(gqa_eligible(getattr(layer, "self_attn", None), model.config) is None for layer in inner.layers):
        return None
    return int(model.config.max_position_embeddings)


@contextlib.contextmanager
def attention_ops_for_onnx(model):
    """While the ONNX route exports: every decoder layer's attention whose math `aqlm.gqa_attention` covers
    (`gqa_eligible`) computes through it: rotary, the KV-cache append and causal grouped-query attention in one
    node, which targets/onnx.py writes as ORT's `com.microsoft.GroupQueryAttention` (its CPU kernel; docs/tvm-and-
    ort-notes.md N27). Traced from the HF modules, the same work is ≈ 40 small ONNX nodes per layer (reshapes,
    transposes, the rotate-half slices, repeat_kv expands, mask arithmetic) that ONNX Runtime runs one by one.
    The rotary table is computed once, [max_position_embeddings, head_dim/2] (`gqa_max_positions`: the longest
    sequence the exported decoder then takes), from the model's own rotary module (its inverse frequencies and
    attention scaling). Layers it does not cover keep their traced form. The Relax route keeps the HF forward too
    (its kernels are fused by TVM), so everything is restored afterwards, also when the export fails."""
    inner = getattr(model, "model", None)
    max_positions = gqa_max_positions(model)
    if max_positions is None:
        yield model
        return
    config = model.config
    chosen = [attn for attn in (getattr(layer, "self_attn", None) for layer in inner.layers)
              if attn is not None and gqa_eligible(attn, config) is None]
    positions = torch.arange(max_positions, dtype=torch.float32)
    freqs = torch.outer(positions, inner.rotary_emb.inv_freq.detach().float())
    scaling = float(getattr(inner.rotary_emb, "attention_scaling", 1.0))
    cos, sin = (freqs.cos() * scaling).contiguous(), (freqs.sin() * scaling).contiguous()
    state = {"mask": None}
    saved = [(m, m.__dict__.get("forward")) for m in (inner, *chosen)]  # an instance forward set before this
    inner_forward = inner.forward

    def forward_keeping_mask(*args, **kwargs):
        # the op takes the [1, P+S] mask as the runtimes pass it (HF hands the attention a 4-D one, or none)
        state["mask"] = kwargs.get("attention_mask")
        try:
            return inner_forward(*args, **kwargs)
        finally:
            state["mask"] = None  # no tensor left on the modules once traced

    try:
        # buffers of the inner model for the trace: one named table for all layers (a tensor attribute per layer
        # would become a lifted constant per layer)
        inner.register_buffer("aqlm_rope_cos", cos, persistent=False)
        inner.register_buffer("aqlm_rope_sin", sin, persistent=False)
        for attn in chosen:
            head_dim = attn.head_dim
            attn._aqlm_gqa = {"state": state, "tables": inner, "scale": float(attn.scaling),
                              "num_heads": attn.q_proj.out_features // head_dim,
                              "kv_num_heads": attn.k_proj.out_features // head_dim}
            attn.forward = types.MethodType(_attention_gqa, attn)
        inner.forward = forward_keeping_mask
        yield model
    finally:
        for module, forward in saved:
            module.__dict__.pop("forward", None)
            if forward is not None:
                module.forward = forward
        for attn in chosen:
            attn.__dict__.pop("_aqlm_gqa", None)
        for name in ("aqlm_rope_cos", "aqlm_rope_sin"):
            inner._buffers.pop(name, None)


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


def scales_for_kernels(model) -> None:
    """Each AqlmLinear's scales as the compiled kernels take them — fp32, one per output row — stored once in the
    graph's parameters instead of converted on every call (the whole-model TVM route). The values are the
    checkpoint's fp16 ones exactly. A new parameter object, so a graph exported before keeps its own."""
    for module in model.modules():
        if isinstance(module, AqlmLinear):
            module.scales = torch.nn.Parameter(module.scales.detach().float().reshape(-1), requires_grad=False)


def keep_head_int8(model) -> None:
    """The dense linears (the lm_head) — and an embedding tied to one — stored as int8 rows with a per-row fp32
    scale (`rows_int8`): half the bytes of fp16 streamed per token for the head. The head computes
    `aqlm.linear_rows_int8`; the embedding reads its row and scale (`embedding(W8) · s[id]`). A tied pair stays
    one pair of parameters. Apply after `keep_dense_fp16`."""
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    heads = {id(m.weight) for m in linears}
    chosen = [(m, m in linears) for m in model.modules()
              if m in linears or (isinstance(m, torch.nn.Embedding) and id(getattr(m, "weight", None)) in heads)]
    done: dict[int, tuple[torch.nn.Parameter, torch.nn.Parameter]] = {}
    for module, _ in chosen:
        if id(module.weight) not in done:
            w8, s = rows_int8(module.weight)
            done[id(module.weight)] = (torch.nn.Parameter(w8, requires_grad=False),
                                       torch.nn.Parameter(s, requires_grad=False))
    for module, is_linear in chosen:
        module.weight8, module.row_scales = done[id(module.weight)]
        del module.weight  # the fp16 copy must not become a (dead) parameter of the exported graph
        module.forward = types.MethodType(_linear_rows_int8 if is_linear else _embedding_rows_int8, module)


def _linear_rows_int8(self, x):
    y = torch.ops.aqlm.linear_rows_int8(x, self.weight8, self.row_scales)
    return y if self.bias is None else y + self.bias.float()
