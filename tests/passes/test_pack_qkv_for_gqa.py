"""Before/after of passes/pack_qkv_for_gqa.py: a Split of one tensor into a GroupQueryAttention's query, key and value
goes, and the node reads the tensor packed (key and value omitted); stock ONNX Runtime gives the same outputs before
and after. A Split whose outputs another node reads, or whose sizes are not [H·D, H_kv·D, H_kv·D], stays."""

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from aqlm_compile.passes.aqlm_attention_for_ort import aqlm_attention_for_ort
from aqlm_compile.passes.pack_qkv_for_gqa import pack_qkv_for_gqa
from aqlm_compile.targets.onnx import make_portable, register_schema

H, G, D, MAX_POS = 4, 2, 16, 32


def model(sizes=(H * D, G * D, G * D), extra_reader=False, axis=2):
    """x [1, S, (H+2G)·D] → Split(sizes) → GroupQueryAttention (ORT's op); `extra_reader`: a Relu also reads k."""
    register_schema()
    f, i32 = TensorProto.FLOAT, TensorProto.INT32
    nodes = [helper.make_node("Split", ["x", "sizes"], ["q", "k", "v"], name="split", axis=axis),
             helper.make_node("GroupQueryAttention", ["q", "k", "v", "past_k", "past_v", "seqlens_k", "total", "cos",
                                                      "sin"], ["out", "present_k", "present_v"], name="gqa",
                              domain="com.microsoft", num_heads=H, kv_num_heads=G, scale=D ** -0.5, do_rotary=1,
                              rotary_interleaved=0)]
    outputs = [helper.make_tensor_value_info(n, f, shape) for n, shape in
               (("out", [1, "S", H * D]), ("present_k", [1, G, "T", D]), ("present_v", [1, G, "T", D]))]
    if extra_reader:
        nodes.append(helper.make_node("Relu", ["k"], ["k_relu"]))
        outputs.append(helper.make_tensor_value_info("k_relu", f, [1, "S", G * D]))
    inputs = [helper.make_tensor_value_info("x", f, [1, "S", (H + 2 * G) * D]),
              helper.make_tensor_value_info("past_k", f, [1, G, "P", D]),
              helper.make_tensor_value_info("past_v", f, [1, G, "P", D]),
              helper.make_tensor_value_info("seqlens_k", i32, [1]), helper.make_tensor_value_info("total", i32, [])]
    freqs = np.outer(np.arange(MAX_POS), 1.0 / 10000 ** (np.arange(0, D, 2) / D))
    inits = [numpy_helper.from_array(np.array(sizes, np.int64), "sizes"),
             numpy_helper.from_array(np.cos(freqs).astype(np.float32), "cos"),
             numpy_helper.from_array(np.sin(freqs).astype(np.float32), "sin")]
    return helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, inits),
                             opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)],
                             ir_version=10)


def run(m, s=3, p=5):
    rng = np.random.default_rng(0)
    feeds = {"x": rng.standard_normal((1, s, (H + 2 * G) * D)).astype(np.float32),
             "past_k": rng.standard_normal((1, G, p, D)).astype(np.float32),
             "past_v": rng.standard_normal((1, G, p, D)).astype(np.float32),
             "seqlens_k": np.array([p + s - 1], np.int32), "total": np.array(p + s, np.int32)}
    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def test_split_goes_and_the_query_is_packed():
    before = model()
    ir_model = ir.from_proto(before)
    assert pack_qkv_for_gqa(ir_model) == {"packed": 1, "kept": {}}
    after = ir.to_proto(ir_model)
    onnx.checker.check_model(after)
    assert [n.op_type for n in after.graph.node] == ["GroupQueryAttention"]
    assert list(after.graph.node[0].input) == ["x", "", "", "past_k", "past_v", "seqlens_k", "total", "cos", "sin"]
    for want, got in zip(run(before), run(after)):
        np.testing.assert_array_equal(got, want)
    # the op library takes the packed node too, and the portable twin gives ORT's op back, still packed
    assert aqlm_attention_for_ort(ir_model)["rewritten"] == 1
    portable = make_portable(ir.to_proto(ir_model))
    assert [(n.domain, list(n.input)[:3]) for n in portable.graph.node] == [("com.microsoft", ["x", "", ""])]


def test_other_splits_stay():
    for kwargs, reason in ((dict(extra_reader=True), "another node reads"),
                           (dict(sizes=(G * D, H * D, G * D)), "are not [num_heads·D"),
                           (dict(axis=1, sizes=(1, 1, 1)), "along axis 1")):
        ir_model = ir.from_proto(model(**kwargs))
        report = pack_qkv_for_gqa(ir_model)
        assert report["packed"] == 0 and reason in report["kept"]["gqa"], (kwargs, report)
        assert [n.op_type for n in ir.to_proto(ir_model).graph.node][:2] == ["Split", "GroupQueryAttention"]
