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
