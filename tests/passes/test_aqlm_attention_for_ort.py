"""Before/after of passes/aqlm_attention_for_ort.py: the GroupQueryAttention nodes the export writes move to the
`aqlm` domain (the op library's op) with their inputs, outputs and attributes unchanged; nodes the op library does
not compute (another rotary, extra attributes, fp16) stay ORT's; `make_portable` gives ORT's op back."""

import onnx
import onnx_ir as ir
from onnx import TensorProto, helper

from aqlm_compile.passes.aqlm_attention_for_ort import aqlm_attention_for_ort
from aqlm_compile.targets.onnx import make_portable, register_schema

NAMES = ["q", "k", "v", "past_k", "past_v", "seqlens_k", "total", "cos", "sin"]


def model(nodes_attrs, dtype=TensorProto.FLOAT):
    """One GroupQueryAttention node per attribute dict, each reading the same graph inputs."""
    register_schema()
    nodes, outputs = [], []
    for i, attrs in enumerate(nodes_attrs):
        outs = [f"out{i}", f"present_k{i}", f"present_v{i}"]
        nodes.append(helper.make_node("GroupQueryAttention", NAMES, outs, name=f"gqa{i}", domain="com.microsoft",
                                      **attrs))
        outputs += [helper.make_tensor_value_info(o, dtype, shape)
                    for o, shape in zip(outs, ([1, "S", 64], [1, 2, "T", 16], [1, 2, "T", 16]))]
    dims = {"q": [1, "S", 64], "k": [1, "S", 32], "v": [1, "S", 32], "past_k": [1, 2, "P", 16],
            "past_v": [1, 2, "P", 16], "seqlens_k": [1], "total": [], "cos": [32, 8], "sin": [32, 8]}
    inputs = [helper.make_tensor_value_info(n, TensorProto.INT32 if n in ("seqlens_k", "total") else dtype, dims[n])
              for n in NAMES]
    return helper.make_model(helper.make_graph(nodes, "g", inputs, outputs),
                             opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)],
                             ir_version=10)


BASE = dict(num_heads=4, kv_num_heads=2, scale=0.25, do_rotary=1, rotary_interleaved=0)


def test_eligible_nodes_move_to_the_aqlm_domain_unchanged():
    before = model([BASE, {**BASE, "rotary_interleaved": 1}, {**BASE, "local_window_size": 8},
                    {k: v for k, v in BASE.items() if k != "do_rotary"}])
    ir_model = ir.from_proto(before)
    report = aqlm_attention_for_ort(ir_model)
    after = ir.to_proto(ir_model)
    assert report["rewritten"] == 1
    assert set(report["kept"]) == {"gqa1", "gqa2", "gqa3"}
    assert "local_window_size" in report["kept"]["gqa2"] and "half-split" in report["kept"]["gqa1"]
    assert [n.domain for n in after.graph.node] == ["aqlm", "com.microsoft", "com.microsoft", "com.microsoft"]
    for b, a in zip(before.graph.node, after.graph.node):  # nothing else changed
        assert (list(a.input), list(a.output), a.op_type) == (list(b.input), list(b.output), b.op_type)
        assert {x.name: helper.get_attribute_value(x) for x in a.attribute} == \
               {x.name: helper.get_attribute_value(x) for x in b.attribute}
    assert {o.domain: o.version for o in after.opset_import}["aqlm"] == 1
    # the aqlm-domain schema (targets/onnx.py) takes it; the portable twin has ORT's op again, same attributes
    two = ir.from_proto(model([BASE, {**BASE, "rotary_interleaved": 1}]))
    aqlm_attention_for_ort(two)
    rewritten = ir.to_proto(two)
    onnx.checker.check_model(rewritten)
    portable = make_portable(rewritten)
    assert [n.domain for n in portable.graph.node] == ["com.microsoft"] * 2
    assert [list(n.attribute) for n in portable.graph.node] == [list(n.attribute) for n in rewritten.graph.node]


def test_fp16_attention_stays_ort():
    ir_model = ir.from_proto(model([BASE], dtype=TensorProto.FLOAT16))
    report = aqlm_attention_for_ort(ir_model)
    assert report == {"rewritten": 0, "kept": {"gqa0": "not fp32"}}
    assert "aqlm" not in ir_model.opset_imports
