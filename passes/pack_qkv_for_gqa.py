"""pack_qkv_for_gqa: a fused q/k/v output split into query, key and value → GroupQueryAttention reads it packed.

Matches (on the exported ONNX graph, onnx_ir): a `GroupQueryAttention` node (ORT's `com.microsoft` op or the op
library's `aqlm` one) whose query, key and value are the three outputs, in order, of one `Split` of a rank-3 tensor
along its last axis with constant sizes [num_heads·D, kv_num_heads·D, kv_num_heads·D], where no other node reads
those outputs. That is what the ONNX route writes for the fused q/k/v layer (passes/fuse_shared_input.py: one
`AqlmMatMul` with three partitions, then `aten.split_with_sizes`).
Emits: the same node with the unsplit tensor as its query and key and value omitted: ORT's packed-QKV form of the
op (query [B, S, (H + 2·H_kv)·D]), which stock ONNX Runtime and the op library both compute. The Split goes.
Why: one ORT node fewer per layer and no copy of the q/k/v output: the 30 Splits of a SmolLM2 decode step were
0.45 ms of ORT's profiled 11.2 ms step (docs/tvm-and-ort-notes.md N36).
Where: the ONNX route (targets/onnx.py `export_onnx`), after the export and before `aqlm_attention_for_ort`; the
portable twin inherits the packed form (stock ORT's op accepts it).
"""

from __future__ import annotations

import onnx_ir as ir

GQA_DOMAINS = ("com.microsoft", "aqlm")
OP_TYPE = "GroupQueryAttention"


def split_sizes(split: ir.Node) -> list[int] | None:
    """The constant sizes of a `Split` (its second input), or None when absent or computed at run time."""
    if len(split.inputs) < 2 or split.inputs[1] is None:
        return None
    tensor = ir.convenience.get_const_tensor(split.inputs[1])
    return None if tensor is None else [int(v) for v in tensor.numpy().reshape(-1)]


def why_not(node: ir.Node) -> str | None:
    """None when `node`'s query, key and value can be handed over packed; else why not."""
    if len(node.inputs) < 3 or any(v is None for v in node.inputs[:3]):
        return "query, key and value are not three inputs (already packed?)"
    split = node.inputs[0].producer()
    if split is None or split.op_type != "Split" or split.domain not in ("", "ai.onnx"):
        return "query is not an output of a Split"
    if len(split.outputs) != 3 or list(node.inputs[:3]) != list(split.outputs):
        return "query, key and value are not the three outputs of one Split, in order"
    source = split.inputs[0]
    rank = len(source.shape) if source.shape is not None else None
    if rank != 3:
        return "the split tensor is not of rank 3"
    axis = split.attributes.get_int("axis", 0)
    if axis not in (-1, rank - 1):
        return f"the Split is along axis {axis}, not the last"
    sizes = split_sizes(split)
    heads, kv_heads = node.attributes.get_int("num_heads", 0), node.attributes.get_int("kv_num_heads", 0)
    if sizes is None or heads < 1 or kv_heads < 1 or sizes[0] % heads:
        return "the Split's sizes are not constant multiples of the heads"
    head_dim = sizes[0] // heads
    if sizes != [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]:
        return f"Split sizes {sizes} are not [num_heads·D, kv_num_heads·D, kv_num_heads·D]"
    for out in split.outputs:
        if len(out.uses()) != 1 or out.is_graph_output():
            return "another node reads the split query, key or value"
    return None


def pack_qkv_for_gqa(model: ir.Model) -> dict:
    """Rewrite the eligible nodes in place; returns {"packed": count, "kept": {node name: reason}}."""
    packed, kept = 0, {}
    for node in list(model.graph):
        if node.domain not in GQA_DOMAINS or node.op_type != OP_TYPE:
            continue
        reason = why_not(node)
        if reason is not None:
            kept[node.name or f"#{packed + len(kept)}"] = reason
            continue
        split = node.inputs[0].producer()
        node.replace_input_with(0, split.inputs[0])
        node.replace_input_with(1, None)
        node.replace_input_with(2, None)
        model.graph.remove(split, safe=True)
        packed += 1
    return {"packed": packed, "kept": kept}
