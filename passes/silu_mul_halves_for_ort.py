"""silu_mul_halves_for_ort: the gated MLP over a fused gate/up output → one `aqlm.SiluMulHalves` node.

Matches (on the exported ONNX graph, onnx_ir): `g, u = Split(t, [F, F])` along the last axis of a rank-3 float
tensor, then `Mul(Mul(g, Sigmoid(g)), u)` (SiLU as torch.onnx writes it; either operand order of each Mul), where no
other node reads g, u, the sigmoid or the SiLU — what the ONNX route writes for a fused gate/up layer
(passes/fuse_shared_input.py: one `AqlmMatMul` with two partitions, `aten.split_with_sizes`, `silu`, `mul`) — and F
is among the `halves` the artifact's kernel library has kernels for.
Emits: `aqlm.SiluMulHalves(t)` → [..., F], y = silu(t[..., :F]) · t[..., F:], which the op library computes with
kernels/elementwise.py `silu_mul_halves` (docs/aqlm-onnx-op.md); `make_portable` defines it from standard ops.
Why: four ORT nodes per layer become one, and gate and up are never copied out of the fused output: in the
SmolLM2 decode step the Splits, sigmoids and multiplies were ≈ 0.6 ms of ORT's profiled 11.2 ms
(docs/tvm-and-ort-notes.md N36).
Where: the ONNX route (targets/onnx.py `export_onnx`), on the exported model before it is saved; `halves` comes from
the build plan (targets/plan.py `silu_mul_requests`), which asked the kernel library for the same sizes.
"""

from __future__ import annotations

import onnx_ir as ir

from .pack_qkv_for_gqa import split_sizes

DOMAIN = "aqlm"
OP_TYPE = "SiluMulHalves"


def _only_reader(value: ir.Value) -> ir.Node | None:
    uses = value.uses()
    if len(uses) != 1 or value.is_graph_output():
        return None
    return uses[0].node


def _other(node: ir.Node, value: ir.Value) -> ir.Value | None:
    """The other input of a two-input node one of whose inputs is `value`."""
    if len(node.inputs) != 2:
        return None
    a, b = node.inputs
    return b if a is value else a if b is value else None


def _match(split: ir.Node, halves) -> list[ir.Node] | None:
    """The pattern's nodes after `split` — [sigmoid, silu Mul, final Mul] — when `split` starts it; else None."""
    if split.op_type != "Split" or split.domain not in ("", "ai.onnx") or len(split.outputs) != 2:
        return None
    source = split.inputs[0]
    if source.shape is None or len(source.shape) != 3 or source.dtype != ir.DataType.FLOAT:
        return None
    if split.attributes.get_int("axis", 0) not in (-1, 2):
        return None
    sizes = split_sizes(split)
    if sizes is None or len(sizes) != 2 or sizes[0] != sizes[1] or sizes[0] not in halves:
        return None
    g, u = split.outputs
    g_uses = [use.node for use in g.uses()]
    if len(g_uses) != 2 or g.is_graph_output():
        return None
    sigmoid = next((n for n in g_uses if n.op_type == "Sigmoid" and n.domain in ("", "ai.onnx")), None)
    silu = next((n for n in g_uses if n.op_type == "Mul" and n.domain in ("", "ai.onnx")), None)
    if sigmoid is None or silu is None or _other(silu, g) is not sigmoid.outputs[0]:
        return None
    if _only_reader(sigmoid.outputs[0]) is not silu:
        return None
    final = _only_reader(silu.outputs[0])
    if final is None or final.op_type != "Mul" or final.domain not in ("", "ai.onnx") or final.outputs[0].is_graph_output():
        return None
    if _other(final, silu.outputs[0]) is not u or _only_reader(u) is not final:
        return None
    return [sigmoid, silu, final]


def silu_mul_halves_for_ort(model: ir.Model, halves) -> dict:
    """Rewrite every match in place; `halves`: the F values with kernels. Returns {"rewritten": count}."""
    halves = set(halves)
    rewritten = 0
    for split in list(model.graph):
        found = _match(split, halves)
        if found is None:
            continue
        sigmoid, silu, final = found
        node = ir.Node(DOMAIN, OP_TYPE, [split.inputs[0]], name=final.name or None)
        model.graph.insert_before(split, node)
        out, old = node.outputs[0], final.outputs[0]
        out.dtype, out.shape = ir.DataType.FLOAT, old.shape  # float: _match checked the source
        ir.convenience.replace_all_uses_with(old, out)
        model.graph.remove([final, silu, sigmoid, split], safe=True)
        rewritten += 1
    if rewritten:
        model.opset_imports.setdefault(DOMAIN, 1)
    return {"rewritten": rewritten}
