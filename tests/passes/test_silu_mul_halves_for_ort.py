"""Before/after of passes/silu_mul_halves_for_ort.py: Split into two halves, Sigmoid, Mul, Mul (the gated MLP as
torch.onnx writes it) becomes one `aqlm.SiluMulHalves` node when its width has kernels; the portable twin (stock ORT,
the op defined from standard ops) gives the same outputs as the graph before. Other shapes of the pattern stay."""

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from aqlm_compile.passes.silu_mul_halves_for_ort import silu_mul_halves_for_ort
from aqlm_compile.targets.onnx import make_portable

F = 24


def model(swap=False, extra_reader=False, sizes=(F, F)):
    """x [1, S, 2F] → Split → silu(gate) · up → Relu (the next layer); `swap`: each Mul's operands the other way
    round; `extra_reader`: a Neg also reads the up half."""
    f = TensorProto.FLOAT
    n = helper.make_node
    nodes = [n("Split", ["x", "sizes"], ["g", "u"], axis=2),
             n("Sigmoid", ["g"], ["sg"]),
             n("Mul", ["sg", "g"] if swap else ["g", "sg"], ["silu"]),
             n("Mul", ["u", "silu"] if swap else ["silu", "u"], ["gated"]),
             n("Relu", ["gated"], ["y"])]
    outputs = [helper.make_tensor_value_info("y", f, [1, "S", sizes[0]])]
    if extra_reader:
        nodes.append(n("Neg", ["u"], ["neg_u"]))
        outputs.append(helper.make_tensor_value_info("neg_u", f, [1, "S", sizes[1]]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", f, [1, "S", sum(sizes)])], outputs,
                              [numpy_helper.from_array(np.array(sizes, np.int64), "sizes")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def run(m):
    x = np.random.default_rng(0).standard_normal((1, 5, 2 * F)).astype(np.float32) * 3
    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})


def test_gated_mlp_becomes_one_node():
    for swap in (False, True):
        before = model(swap=swap)
        ir_model = ir.from_proto(before)
        assert silu_mul_halves_for_ort(ir_model, {F, 100}) == {"rewritten": 1}
        after = ir.to_proto(ir_model)
        onnx.checker.check_model(after)
        assert [(n.domain, n.op_type) for n in after.graph.node] == [("aqlm", "SiluMulHalves"), ("", "Relu")]
        assert list(after.graph.node[0].input) == ["x"]
        assert after.graph.node[1].input[0] == after.graph.node[0].output[0]
        portable = make_portable(after)
        np.testing.assert_allclose(run(portable)[0], run(before)[0], rtol=1e-6, atol=1e-6)


def test_other_graphs_stay():
    for kwargs, halves in ((dict(), {F + 8}), (dict(extra_reader=True), {F}), (dict(sizes=(F, F + 8)), {F})):
        ir_model = ir.from_proto(model(**kwargs))
        assert silu_mul_halves_for_ort(ir_model, halves) == {"rewritten": 0}, kwargs
        assert [n.op_type for n in ir.to_proto(ir_model).graph.node][:4] == ["Split", "Sigmoid", "Mul", "Mul"]
