"""The ONNX route: lowered exported program → ONNX decoder with `aqlm.AqlmMatMul` nodes, and its portable twin.

- `AQLM_MATMUL_SCHEMA` is the op's ONNX schema (domain `aqlm`, version 1; spec in docs/aqlm-onnx-op.md), registered
  with the onnx package so the exporter can emit it and `onnx.checker` can check it.
- `export_onnx` translates every `aqlm.aqlm_gemm` node into one `AqlmMatMul` (attributes num_codebooks,
  nbits_per_codebook, in_group_size, out_group_size) with the checkpoint tensors as initializers in their stored
  dtypes (int8/int16 codes, fp16 codebooks and scales).
- `DENSE_OP_TYPE` (`aqlm.DenseMatMul`): the dense lm_head in its stored form (fp16 rows, or int8 rows + scales),
  from `aqlm.linear_f16` / `aqlm.linear_rows_int8`; the op library runs kernels/dense.py for it (docs N26).
- `make_portable` adds a model-local ONNX function `aqlm.AqlmMatMul` (standard ops only), so stock ONNX Runtime
  runs the same file with no library. Its decode is tied to a runtime value (the input's shape), so ORT's constant
  folding cannot turn it into a dense initializer at session creation (docs/tvm-and-ort-notes.md N9): the model stays
  compressed in memory and pays a per-call decode instead.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper
from onnx.defs import OpSchema

from aqlm_compile.config import AqlmConfig
from aqlm_compile.passes.aqlm_attention_for_ort import aqlm_attention_for_ort
from aqlm_compile.passes.pack_qkv_for_gqa import pack_qkv_for_gqa
from aqlm_compile.passes.silu_mul_halves_for_ort import OP_TYPE as SILU_MUL_OP_TYPE
from aqlm_compile.passes.silu_mul_halves_for_ort import silu_mul_halves_for_ort
from aqlm_compile.passes.skip_rms_norm_for_ort import skip_rms_norm_for_ort

DOMAIN, VERSION = "aqlm", 1
OP_TYPE = "AqlmMatMul"
ATTRIBUTES = ("num_codebooks", "nbits_per_codebook", "in_group_size", "out_group_size")


def _schema() -> OpSchema:
    P = OpSchema.FormalParameter
    return OpSchema(
        OP_TYPE, DOMAIN, VERSION,
        doc="y = x · Ŵᵀ (+ bias), Ŵ[o, j·g:(j+1)·g] = scales[o] · Σ_m codebooks[m, codes[o, j, m] mod 2^B, 0, :]. "
            "See docs/aqlm-onnx-op.md.",
        inputs=[P("x", "T", "activations [..., in]"),
                P("codes", "TC", "codes [out, in/g, M], signed storage of B-bit values"),
                P("codebooks", "TB", "codebooks [M, 2^B, 1, g]"),
                P("scales", "TS", "per-output scales [out, 1, 1, 1]"),
                P("bias", "T", "bias [out]", param_option=OpSchema.FormalParameterOption.Optional),
                P("partitions", "TP", "row partitions of a fused layer [P] (sum = out); codebooks [P·M, K, 1, g]",
                  param_option=OpSchema.FormalParameterOption.Optional)],
        outputs=[P("y", "T", "[..., out]")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], "activations"),
                          ("TC", ["tensor(int8)", "tensor(int16)"], "codes"),
                          ("TB", ["tensor(float16)", "tensor(float)"], "codebooks"),
                          ("TS", ["tensor(float16)", "tensor(float)"], "scales"),
                          ("TP", ["tensor(int64)"], "partitions")],
        attributes=[OpSchema.Attribute(name, OpSchema.AttrType.INT, doc, required=True) for name, doc in (
            ("num_codebooks", "M"), ("nbits_per_codebook", "B (codebook size 2^B)"), ("in_group_size", "g"),
            ("out_group_size", "1 (the only value in published models)"))],
    )


DENSE_OP_TYPE = "DenseMatMul"


def _dense_schema() -> OpSchema:
    P = OpSchema.FormalParameter
    return OpSchema(
        DENSE_OP_TYPE, DOMAIN, VERSION,
        doc="y = x · Wᵀ, or with scales y[..., o] = scales[o] · Σ_i x[..., i] · W[o, i]: a dense layer (the lm_head) "
            "in its stored form, fp16 or int8 rows. See docs/aqlm-onnx-op.md.",
        inputs=[P("x", "T", "activations [..., in]"),
                P("weight", "TW", "rows [out, in]"),
                P("scales", "T", "per-row scale [out] (int8 rows only)",
                  param_option=OpSchema.FormalParameterOption.Optional)],
        outputs=[P("y", "T", "[..., out]")],
        type_constraints=[("T", ["tensor(float)"], "activations"),
                          ("TW", ["tensor(float16)", "tensor(int8)"], "weights")],
    )


def register_schema() -> None:
    if not onnx.defs.has(OP_TYPE, DOMAIN):
        onnx.defs.register_schema(_schema())
    if not onnx.defs.has(DENSE_OP_TYPE, DOMAIN):
        onnx.defs.register_schema(_dense_schema())
    if not onnx.defs.has(GQA_OP_TYPE, ORT_DOMAIN):
        onnx.defs.register_schema(_gqa_schema())
    if not onnx.defs.has(GQA_OP_TYPE, DOMAIN):
        onnx.defs.register_schema(_gqa_schema(DOMAIN))


def _translation():
    import onnxscript

    register_schema()
    opset = onnxscript.values.Opset(DOMAIN, VERSION)

    def aqlm_gemm(x, codes, codebooks, scales, bias=None, partitions=None):
        from onnxscript import opset18 as op

        cfg = AqlmConfig.from_shapes(tuple(codes.shape), tuple(codebooks.shape))
        inputs = [x, codes, codebooks, scales]
        if partitions:
            inputs += [bias, op.Constant(value_ints=[int(p) for p in partitions])]
        elif bias is not None:
            inputs.append(bias)
        return opset.AqlmMatMul(*inputs, num_codebooks=cfg.num_codebooks, nbits_per_codebook=cfg.nbits_per_codebook,
                                in_group_size=cfg.in_group_size, out_group_size=cfg.out_group_size)

    return aqlm_gemm


def _dense_translations() -> dict:
    """`aqlm.linear_f16` / `aqlm.linear_rows_int8` (export.dense_ops_for_onnx, export.keep_head_int8) →
    `aqlm.DenseMatMul`."""
    import onnxscript
    import torch

    register_schema()
    opset = onnxscript.values.Opset(DOMAIN, VERSION)

    def linear_f16(x, weight):
        return opset.DenseMatMul(x, weight)

    def linear_rows_int8(x, weight, scales):
        return opset.DenseMatMul(x, weight, scales)

    return {torch.ops.aqlm.linear_f16.default: linear_f16, torch.ops.aqlm.linear_rows_int8.default: linear_rows_int8}


ORT_DOMAIN = "com.microsoft"
GQA_OP_TYPE = "GroupQueryAttention"


def _gqa_schema(domain: str = ORT_DOMAIN) -> OpSchema:
    """The part of ONNX Runtime's contrib schema of GroupQueryAttention (since ORT 1.17; inputs in its order) that
    the export writes: the onnx package has no com.microsoft schemas, and the exporter and onnx.checker want one.
    The same schema in the `aqlm` domain is the op library's op (passes/aqlm_attention_for_ort.py)."""
    P, opt = OpSchema.FormalParameter, OpSchema.FormalParameterOption.Optional
    return OpSchema(
        GQA_OP_TYPE, domain, 1,
        doc="Grouped-query attention with KV cache: ONNX Runtime's contrib op, or the aqlm op library's op of the "
            "same semantics; see docs/tvm-and-ort-notes.md N27, N33 and docs/aqlm-onnx-op.md.",
        inputs=[P("query", "T", "[B, S, H·D]"), P("key", "T", "[B, S, H_kv·D]", param_option=opt),
                P("value", "T", "[B, S, H_kv·D]", param_option=opt),
                P("past_key", "T", "[B, H_kv, P, D]", param_option=opt),
                P("past_value", "T", "[B, H_kv, P, D]", param_option=opt),
                P("seqlens_k", "M", "[B]: total length - 1"), P("total_sequence_length", "M", "scalar"),
                P("cos_cache", "T", "[max_positions, D/2]", param_option=opt),
                P("sin_cache", "T", "[max_positions, D/2]", param_option=opt)],
        outputs=[P("output", "T", "[B, S, H·D]"), P("present_key", "T", "[B, H_kv, P+S, D]"),
                 P("present_value", "T", "[B, H_kv, P+S, D]")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], "activations"),
                          ("M", ["tensor(int32)"], "lengths")],
        attributes=[OpSchema.Attribute("num_heads", OpSchema.AttrType.INT, "query heads", required=True),
                    OpSchema.Attribute("kv_num_heads", OpSchema.AttrType.INT, "key/value heads", required=True),
                    OpSchema.Attribute("scale", OpSchema.AttrType.FLOAT, "softmax scale", required=False),
                    OpSchema.Attribute("do_rotary", OpSchema.AttrType.INT, "apply rotary", required=False),
                    OpSchema.Attribute("rotary_interleaved", OpSchema.AttrType.INT, "0: half-split",
                                       required=False)],
    )


def _attention_translations() -> dict:
    """`aqlm.gqa_attention` (export.attention_ops_for_onnx) → ORT's `com.microsoft.GroupQueryAttention` with its own
    rotary (do_rotary, half-split) and the past/present KV tensors the decoder already has ([1, H_kv, P, D] →
    [1, H_kv, P+S, D]). Its sequence inputs come from the length of the [1, P+S] mask (all ones: no padding):
    seqlens_k = P+S-1 (int32 [1]), total_sequence_length = P+S (int32 scalar); every layer's are the same nodes,
    which the exporter's optimizer merges. docs/tvm-and-ort-notes.md N27."""
    import onnxscript
    import torch

    register_schema()
    ms = onnxscript.values.Opset(ORT_DOMAIN, 1)

    def gqa_attention(q, k, v, past_k, past_v, attention_mask, cos_cache, sin_cache, num_heads, kv_num_heads, scale):
        from onnxscript import opset18 as op

        one = op.Constant(value_ints=[1])
        total = op.Slice(op.Shape(attention_mask), one, op.Constant(value_ints=[2]))  # [P+S], int64
        seqlens_k = op.Cast(op.Sub(total, one), to=TensorProto.INT32)
        total = op.Cast(op.Squeeze(total), to=TensorProto.INT32)
        # the op wants the table in the activations' type (fp32 here; a constant cast ORT folds)
        cos_cache, sin_cache = op.CastLike(cos_cache, q), op.CastLike(sin_cache, q)
        return ms.GroupQueryAttention(q, k, v, past_k, past_v, seqlens_k, total, cos_cache, sin_cache,
                                      num_heads=int(num_heads), kv_num_heads=int(kv_num_heads), do_rotary=1,
                                      rotary_interleaved=0, scale=float(scale))

    return {torch.ops.aqlm.gqa_attention.default: gqa_attention}


ATTENTIONS = {"ort": ORT_DOMAIN, "aqlm": DOMAIN}  # build --ort-attention: the domain of the GroupQueryAttention nodes


def gqa_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The GroupQueryAttention nodes: ORT's (com.microsoft) or the op library's (aqlm)."""
    return [n for n in model.graph.node if n.domain in (ORT_DOMAIN, DOMAIN) and n.op_type == GQA_OP_TYPE]


def rotary_positions(model: onnx.ModelProto) -> int | None:
    """The rows of the rotary table the model's GroupQueryAttention nodes read: the most positions (past +
    new tokens) the decoder takes. None without such nodes."""
    nodes = gqa_nodes(model)
    if not nodes:
        return None
    producers = {out: n for n in model.graph.node for out in n.output}
    dims = {t.name: list(t.dims) for t in model.graph.initializer}
    name = nodes[0].input[7]
    while name not in dims and name in producers and producers[name].op_type in ("CastLike", "Cast", "Identity"):
        name = producers[name].input[0]
    if name not in dims:
        raise ValueError(f"{nodes[0].name}: the rotary table {name!r} is not an initializer")
    return int(dims[name][0])


# A protobuf message cannot pass 2 GiB: above this many bytes of initializers the weights go to one external data
# file beside the graph (`<model>.onnx.data`), which is also what lets ORT memory-map them.
EXTERNAL_DATA_THRESHOLD = 1 << 30
# Offsets of external tensors: onnx_ir aligns to max(4096, this), so every tensor the op library reads starts on a
# page (ORT can map it without a copy) and 64-byte SIMD loads stay aligned.
EXTERNAL_DATA_ALIGNMENT = 64


def external_data_name(path: str | Path) -> str:
    """The external data file of the ONNX model at `path`, relative to its folder."""
    return Path(path).name + ".data"


def export_onnx(ep, spec, path: str | Path, external_data: bool | None = None, attention: str = "ort",
                silu_mul_halves=()) -> onnx.ModelProto:
    """The lowered program `ep` as an ONNX model at `path` (inputs input_ids, attention_mask, past_*; outputs
    logits, present_*), checked with onnx.checker. `external_data`: the initializers go to `<path>.data` (default:
    when they pass `EXTERNAL_DATA_THRESHOLD` bytes); the model returned then holds references, not the data.
    `attention`: "ort" keeps ORT's GroupQueryAttention nodes, "aqlm" hands them to the op library
    (passes/aqlm_attention_for_ort.py). `silu_mul_halves`: the half widths whose gated MLPs become
    `aqlm.SiluMulHalves` (passes/silu_mul_halves_for_ort.py; the kernel library must have their kernels)."""
    if attention not in ATTENTIONS:
        raise ValueError(f"attention={attention!r}: expected one of {', '.join(ATTENTIONS)}")
    import onnx_ir as ir
    import torch

    register_schema()
    prog = torch.onnx.export(ep, dynamo=True, optimize=True, verbose=False,
                             custom_translation_table={torch.ops.aqlm.aqlm_gemm.default: _translation(),
                                                       **_dense_translations(), **_attention_translations()},
                             input_names=["input_ids", "attention_mask", *spec.kv_names()],
                             output_names=["logits", *spec.present_names()])
    skip_rms_norm_for_ort(prog.model)  # passes/skip_rms_norm_for_ort.py
    pack_qkv_for_gqa(prog.model)  # passes/pack_qkv_for_gqa.py
    silu_mul_halves_for_ort(prog.model, silu_mul_halves)  # passes/silu_mul_halves_for_ort.py
    if attention == "aqlm":
        aqlm_attention_for_ort(prog.model)  # passes/aqlm_attention_for_ort.py
    if external_data is None:
        size = sum(v.const_value.nbytes for v in prog.model.graph.initializers.values() if v.const_value is not None)
        external_data = size > EXTERNAL_DATA_THRESHOLD
    if not external_data:
        model = prog.model_proto
        onnx.checker.check_model(model, full_check=False)
        _save(model, path)
        return model
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ir.save(prog.model, path, external_data=external_data_name(path), alignment=EXTERNAL_DATA_ALIGNMENT,
            align_threshold=0)
    onnx.checker.check_model(str(path))  # by path: the checker reads a model past 2 GB and its external data
    return onnx.load(str(path), load_external_data=False)


def external_locations(model: onnx.ModelProto) -> set[str]:
    """The `location` of every tensor in `model` (initializers, attributes, subgraphs) whose data is external."""
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    found = set()
    for t in _get_all_tensors(model):
        if uses_external_data(t):
            found.add(next((e.value for e in t.external_data if e.key == "location"), ""))
    return found


def _save(model: onnx.ModelProto, path) -> None:
    from aqlm_compile.cache import atomic_write_bytes

    atomic_write_bytes(Path(path), model.SerializeToString())


def aqlm_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.domain == DOMAIN and n.op_type == OP_TYPE]


def dense_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.domain == DOMAIN and n.op_type == DENSE_OP_TYPE]


def _portable_dense_function(opset_version: int) -> onnx.FunctionProto:
    """DenseMatMul(x, weight, scales) from standard ops: MatMul(x, Transpose(Cast(weight))), times the scales when
    given (an omitted optional input of a function is an empty name: `OptionalHasElement` is not defined on it in
    every ORT, so make_portable always passes scales — ones for fp16 rows)."""
    n = helper.make_node
    nodes = [
        n("CastLike", ["weight", "x"], ["w"]),
        n("Transpose", ["w"], ["wt"], perm=[1, 0]),
        n("MatMul", ["x", "wt"], ["xw"]),
        n("Mul", ["xw", "scales"], ["y"]),
    ]
    return helper.make_function(DOMAIN, DENSE_OP_TYPE, ["x", "weight", "scales"], ["y"], nodes,
                                [helper.make_opsetid("", opset_version)])


def _portable_silu_mul_function(opset_version: int) -> onnx.FunctionProto:
    """SiluMulHalves(x) from standard ops: g, u = Split(x) into two halves along the last axis; Mul(Mul(g, Sigmoid(g)), u)
    (what passes/silu_mul_halves_for_ort.py replaced)."""
    n = helper.make_node
    nodes = [
        n("Constant", [], ["last"], value=helper.make_tensor("last", TensorProto.INT64, [1], [-1])),
        n("Constant", [], ["two"], value=helper.make_tensor("two", TensorProto.INT64, [1], [2])),
        n("Shape", ["x"], ["shape"]),
        n("Gather", ["shape", "last"], ["width"], axis=0),
        n("Div", ["width", "two"], ["half"]),
        n("Concat", ["half", "half"], ["sizes"], axis=0),
        n("Split", ["x", "sizes"], ["g", "u"], axis=-1),
        n("Sigmoid", ["g"], ["sg"]),
        n("Mul", ["g", "sg"], ["silu"]),
        n("Mul", ["silu", "u"], ["y"]),
    ]
    return helper.make_function(DOMAIN, SILU_MUL_OP_TYPE, ["x"], ["y"], nodes, [helper.make_opsetid("", opset_version)])


def _portable_function(opset_version: int) -> onnx.FunctionProto:
    """AqlmMatMul(x, codes, codebooks, scales, bias, partitions) from standard ops: decode Ŵ (gathers; rows of
    partition p use codebooks p·M..p·M+M-1), then MatMul and Add."""
    n = helper.make_node
    c = lambda name, vals: n("Constant", [], [name], value=helper.make_tensor(name, TensorProto.INT64, [len(vals)], vals))  # noqa: E731,E501
    nodes = [
        c("one", [1]), c("two", [2]), c("three", [3]), c("four", [4]), c("zero1", [0]), c("minus1", [-1]),
        n("Shape", ["codebooks"], ["cb_shape"]),
        n("Slice", ["cb_shape", "one", "two"], ["K"]),
        n("Slice", ["cb_shape", "three", "four"], ["g"]),
        n("Shape", ["codes"], ["codes_shape"]),
        n("Slice", ["codes_shape", "zero1", "one"], ["O"]),
        n("Slice", ["codes_shape", "two", "three"], ["M"]),  # not codebooks.shape[0]: that is P·M when fused
        # A zero computed from the activation's shape: makes the index depend on a runtime value, so ORT's
        # constant folding cannot precompute the dense weight at session creation.
        n("Shape", ["x"], ["x_shape"]),
        n("ReduceMax", ["x_shape"], ["x_max"], keepdims=1),
        n("Sub", ["x_max", "x_max"], ["runtime_zero"]),
        # Where(runtime true, codes, codes): the very first op on the codes depends on a runtime value, so not even an
        # int64 copy of the codes (8× their size) is precomputed. (CastLike would not do: ORT inlines it to a Cast.)
        n("Equal", ["runtime_zero", "runtime_zero"], ["runtime_true"]),
        n("Where", ["runtime_true", "codes", "codes"], ["codes_rt"]),
        n("Cast", ["codes_rt"], ["codes64"], to=TensorProto.INT64),
        n("Mod", ["codes64", "K"], ["unsigned"]),  # signed storage → 0..K-1 (Mod follows the divisor's sign)
        n("Squeeze", ["M", "zero1"], ["M_scalar"]),
        c("zero_s", [0]), c("one_s", [1]),
        n("Squeeze", ["zero_s", "zero1"], ["z"]), n("Squeeze", ["one_s", "zero1"], ["o1"]),
        n("Range", ["z", "M_scalar", "o1"], ["m_range"]),
        n("Mul", ["m_range", "K"], ["m_offset"]),
        n("Add", ["unsigned", "m_offset"], ["idx_m"]),
        # partition of each row: pid[o] = #{partition starts ≤ o}, offset pid·M·K
        n("CumSum", ["partitions", "z"], ["cum"]),
        n("Slice", ["cum", "zero1", "minus1"], ["starts"]),
        n("Squeeze", ["O", "zero1"], ["O_scalar"]),
        n("Range", ["z", "O_scalar", "o1"], ["rows"]),
        n("Unsqueeze", ["rows", "one"], ["rows_col"]),
        n("GreaterOrEqual", ["rows_col", "starts"], ["ge"]),
        n("Cast", ["ge"], ["ge64"], to=TensorProto.INT64),
        n("ReduceSum", ["ge64", "one"], ["pid"], keepdims=0),
        n("Mul", ["M", "K"], ["MK"]),
        n("Mul", ["pid", "MK"], ["p_off"]),
        c("col_shape", [-1, 1, 1]),
        n("Reshape", ["p_off", "col_shape"], ["p_off3"]),
        n("Add", ["idx_m", "p_off3"], ["idx"]),
        n("Concat", ["minus1", "g"], ["flat_shape"], axis=0),
        n("Reshape", ["codebooks", "flat_shape"], ["cb_flat16"]),
        n("CastLike", ["cb_flat16", "x"], ["cb_flat"]),
        n("Gather", ["cb_flat", "idx"], ["words"], axis=0),           # [O, J, M, g]
        n("ReduceSum", ["words", "two"], ["groups"], keepdims=0),     # [O, J, g]
        n("Concat", ["O", "minus1"], ["w_shape"], axis=0),
        n("Reshape", ["groups", "w_shape"], ["w_unscaled"]),          # [O, I]
        n("Concat", ["O", "one"], ["s_shape"], axis=0),
        n("Reshape", ["scales", "s_shape"], ["s16"]),
        n("CastLike", ["s16", "x"], ["s"]),
        n("Mul", ["w_unscaled", "s"], ["w"]),
        n("Transpose", ["w"], ["wt"], perm=[1, 0]),
        n("MatMul", ["x", "wt"], ["y_nobias"]),
        n("Add", ["y_nobias", "bias"], ["y"]),
    ]
    return helper.make_function(DOMAIN, OP_TYPE, ["x", "codes", "codebooks", "scales", "bias", "partitions"], ["y"],
                                nodes,
                                [helper.make_opsetid("", opset_version)],
                                attributes=list(ATTRIBUTES))


def make_portable(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` that stock ONNX Runtime runs: every AqlmMatMul node gets all six inputs (a zero bias and a
    single partition where absent: O floats and one int64 per layer), every DenseMatMul its scales (ones for fp16
    rows), the model carries the functions that define the ops (SiluMulHalves too), and the op library's GroupQueryAttention nodes are
    ORT's own again (the same inputs and attributes: passes/aqlm_attention_for_ort.py)."""
    from onnx import numpy_helper

    portable = onnx.ModelProto()
    portable.CopyFrom(model)
    opset_version = next(o.version for o in portable.opset_import if o.domain in ("", "ai.onnx"))
    shapes = {t.name: tuple(t.dims) for t in portable.graph.initializer}
    inferred = onnx.shape_inference.infer_shapes(portable)  # fused codes are Concat outputs, not initializers
    for vi in inferred.graph.value_info:
        dims = vi.type.tensor_type.shape.dim
        if dims and all(d.HasField("dim_value") for d in dims):
            shapes.setdefault(vi.name, tuple(d.dim_value for d in dims))
    dense = silu_mul = False
    for i, node in enumerate(portable.graph.node):
        if node.domain == DOMAIN and node.op_type == SILU_MUL_OP_TYPE:
            silu_mul = True
            continue
        if node.domain == DOMAIN and node.op_type == GQA_OP_TYPE:
            node.domain = ORT_DOMAIN
            if not any(o.domain == ORT_DOMAIN for o in portable.opset_import):
                portable.opset_import.append(helper.make_opsetid(ORT_DOMAIN, 1))
            continue
        if node.domain == DOMAIN and node.op_type == DENSE_OP_TYPE:
            dense = True
            if len(node.input) < 3 or not node.input[2]:
                if node.input[1] not in shapes:
                    raise ValueError(f"{node.name}: the shape of weight {node.input[1]!r} is unknown")
                ones = f"{node.name or i}_unit_scales"
                portable.graph.initializer.append(numpy_helper.from_array(
                    np.ones(shapes[node.input[1]][0], np.float32), ones))
                inputs = [node.input[0], node.input[1], ones]
                del node.input[:]
                node.input.extend(inputs)
            continue
        if not (node.domain == DOMAIN and node.op_type == OP_TYPE):
            continue
        inputs = list(node.input) + [""] * (6 - len(node.input))
        if inputs[1] not in shapes:
            raise ValueError(f"{node.name}: the shape of codes {inputs[1]!r} is unknown")
        out = shapes[inputs[1]][0]
        if not inputs[4]:
            inputs[4] = f"{node.name or i}_zero_bias"
            portable.graph.initializer.append(numpy_helper.from_array(np.zeros(out, np.float32), inputs[4]))
        if not inputs[5]:
            inputs[5] = f"{node.name or i}_partitions"
            portable.graph.initializer.append(numpy_helper.from_array(np.array([out], np.int64), inputs[5]))
        del node.input[:]
        node.input.extend(inputs)
    del portable.functions[:]
    portable.functions.append(_portable_function(opset_version))
    if dense:
        portable.functions.append(_portable_dense_function(opset_version))
    if silu_mul:
        portable.functions.append(_portable_silu_mul_function(opset_version))
    if not external_locations(portable):  # external data is only found beside a file: checked once written
        onnx.checker.check_model(portable, full_check=False)
    return portable


def onnx_route(ep, spec, report, dense_model_dir=None, external_data: bool | None = None, attention: str = "ort",
               silu_mul_halves=()):
    """The ONNX route of a lowered (fused) decoder graph, to run inside the artifact's write: returns
    (populate(tmp), manifest entry). Writes onnx/model.onnx (AqlmMatMul nodes) and onnx/model.portable.onnx (stock
    ORT); with `dense_model_dir`, also onnx/model.dense.onnx from the FP model, the same-run baseline.
    `external_data` (default: past `EXTERNAL_DATA_THRESHOLD`): the weights in onnx/model.onnx.data, shared by the
    two models, 4096-byte aligned; the manifest entry names it. `attention` (export_onnx): whose GroupQueryAttention
    onnx/model.onnx calls; the portable and dense models always call ORT's. `silu_mul_halves` (export_onnx): the
    gated MLPs model.onnx runs as `aqlm.SiluMulHalves`; the portable model defines the op from standard ops."""
    entry = {"model": "onnx/model.onnx", "portable": "onnx/model.portable.onnx", "decoder": spec.to_json(),
             "op": {"domain": DOMAIN, "op_type": OP_TYPE, "version": VERSION},
             "lowered_layers": len(report["lower_aqlm_linear"]["lowered"]),
             "fused_groups": report["fuse_shared_input"].get("groups", [])}
    if dense_model_dir is not None:
        entry["dense"] = "onnx/model.dense.onnx"

    def populate(tmp: Path):
        from aqlm_compile.cache import atomic_write_bytes

        model = export_onnx(ep, spec, tmp / entry["model"], external_data=external_data, attention=attention,
                            silu_mul_halves=silu_mul_halves)
        positions = rotary_positions(model)
        if positions is not None:  # runtime/ort.py refuses a longer sequence with a clear error
            entry["max_positions"] = positions
            entry["attention"] = f"{gqa_nodes(model)[0].domain}.{GQA_OP_TYPE}"
        if external_locations(model):
            entry["external_data"] = f"onnx/{external_data_name(entry['model'])}"
        # a model with external data: the portable twin refers to the same file (one copy of the weights)
        atomic_write_bytes(tmp / entry["portable"], make_portable(model).SerializeToString())
        if dense_model_dir is not None:
            from aqlm_compile.export import attention_ops_for_onnx, export_decoder
            from aqlm_compile.models import load_fp_model

            fp, _ = load_fp_model(Path(dense_model_dir))
            fp.config.use_cache = True
            with attention_ops_for_onnx(fp):  # the same ONNX attention as the AQLM model: a like-for-like baseline
                dense_ep, dense_spec = export_decoder(fp)
            export_onnx(dense_ep, dense_spec, tmp / entry["dense"], external_data=external_data)
        onnx.checker.check_model(str(tmp / entry["portable"]))

    return populate, entry
