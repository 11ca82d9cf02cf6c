"""Before/after of passes/skip_rms_norm_for_ort.py on hand-built graphs: a residual add + RMSNorm as torch.onnx
writes it becomes one SkipSimplifiedLayerNormalization with the same outputs in ONNX Runtime; a norm without the add,
or with an epsilon that is not a constant, is left alone."""

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from aqlm_compile.passes.skip_rms_norm_for_ort import skip_rms_norm_for_ort

D = 16


def graph(with_add=True, eps_input=False, scale_first=True):
    """(a + b) → RMSNorm·w, outputs (normalised, a + b); or the norm of `a` alone."""
    n = helper.make_node
    s = "s" if with_add else "a"
    nodes = ([n("Add", ["a", "b"], ["s"])] if with_add else []) + [
        n("Pow", [s, "two"], ["sq"]),
        n("ReduceMean", ["sq", "axes"], ["ms"], keepdims=1),
        n("Add", ["ms", "eps"], ["mse"]),
        n("Sqrt", ["mse"], ["rms"]),
        n("Reciprocal", ["rms"], ["inv"]),
        n("Mul", [s, "inv"], ["normed"]),
        n("Mul", ["w", "normed"] if scale_first else ["normed", "w"], ["y"]),
    ]
    inits = [numpy_helper.from_array(np.array(2.0, np.float32), "two"),
             numpy_helper.from_array(np.array([-1], np.int64), "axes"),
             numpy_helper.from_array(np.linspace(0.5, 1.5, D).astype(np.float32), "w")]
    vi = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, "S", D])  # noqa: E731
    inputs = [vi("a"), vi("b")] if with_add else [vi("a")]
    if eps_input:
        inputs.append(helper.make_tensor_value_info("eps", TensorProto.FLOAT, []))
    else:
        inits.append(numpy_helper.from_array(np.array(1e-5, np.float32), "eps"))
    outputs = [vi("y")] + ([vi("s")] if with_add else [])
    model = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, inits),
                              opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    return onnx.shape_inference.infer_shapes(model)


def run(model, feeds):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


@pytest.mark.parametrize("scale_first", [True, False])
def test_add_and_rms_norm_become_one_ort_op(scale_first):
    before = graph(scale_first=scale_first)
    rng = np.random.default_rng(0)
    feeds = {"a": rng.standard_normal((1, 5, D)).astype(np.float32),
             "b": rng.standard_normal((1, 5, D)).astype(np.float32)}
    model = ir.serde.deserialize_model(before)
    assert skip_rms_norm_for_ort(model) == 1
    after = ir.serde.serialize_model(model)
    ops = [(n.domain, n.op_type) for n in after.graph.node]
    assert ops == [("com.microsoft", "SkipSimplifiedLayerNormalization")], ops
    assert helper.get_attribute_value(after.graph.node[0].attribute[0]) == pytest.approx(1e-5)
    for want, got in zip(run(before, feeds), run(after, feeds)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kwargs", [{"with_add": False}, {"eps_input": True}])
def test_other_norms_are_left_alone(kwargs):
    model = ir.serde.deserialize_model(graph(**kwargs))
    assert skip_rms_norm_for_ort(model) == 0
    assert "SkipSimplifiedLayerNormalization" not in {n.op_type for n in model.graph}
