"""aqlm_attention_for_ort: ONNX Runtime's GroupQueryAttention nodes become the op library's `aqlm.GroupQueryAttention`.

Matches (on the exported ONNX graph, onnx_ir): `com.microsoft.GroupQueryAttention` nodes as targets/onnx.py writes
them for `aqlm.gqa_attention` — fp32, all nine inputs (q, k, v, past K/V, seqlens_k, total_sequence_length, the
cos/sin tables; or q, k and v packed in the query with key and value omitted: passes/pack_qkv_for_gqa.py), do_rotary=1 with the half-split rotary (rotary_interleaved=0), and no attribute beyond num_heads,
kv_num_heads, scale, do_rotary and rotary_interleaved.
Emits: the same node (inputs, outputs, attributes) in the `aqlm` domain, which the artifact's ORT op library runs on
the TVM kernels of kernels/attention.py (`rope_kv_append`, then `decode_attention` or `causal_attention`); its
semantics are those of ORT's op for these attributes (docs/aqlm-onnx-op.md).
Why: ORT's CPU GroupQueryAttention took ≈ 36 µs per layer of a SmolLM2 decode step, our decode kernel ≈ 3 µs
(docs/tvm-and-ort-notes.md N33): a fifth of the ONNX route's step.
Where: the ONNX route (targets/onnx.py `export_onnx`, `attention="aqlm"`), after the export and before the model is
saved; `make_portable` turns the nodes back into ORT's op, so the portable twin still runs on stock ORT.
"""

from __future__ import annotations

import onnx_ir as ir

ORT_DOMAIN = "com.microsoft"
AQLM_DOMAIN = "aqlm"
OP_TYPE = "GroupQueryAttention"
ALLOWED_ATTRIBUTES = {"num_heads", "kv_num_heads", "scale", "do_rotary", "rotary_interleaved"}


def why_not(node: ir.Node) -> str | None:
    """None when `node` is a GroupQueryAttention the op library computes; else why not."""
    extra = set(node.attributes) - ALLOWED_ATTRIBUTES
    if extra:
        return f"attributes {sorted(extra)}"
    if node.attributes.get_int("do_rotary", 0) != 1 or node.attributes.get_int("rotary_interleaved", 0) != 0:
        return "not the half-split rotary (do_rotary=1, rotary_interleaved=0)"
    packed = len(node.inputs) == 9 and node.inputs[1] is None and node.inputs[2] is None  # pack_qkv_for_gqa
    if len(node.inputs) != 9 or any(v is None for i, v in enumerate(node.inputs) if not (packed and i in (1, 2))) \
            or len(node.outputs) != 3:
        return "not all nine inputs (or query packed with key and value omitted) and three outputs"
    if node.inputs[0].dtype != ir.DataType.FLOAT:
        return "not fp32"
    return None


def aqlm_attention_for_ort(model: ir.Model) -> dict:
    """Rewrite the eligible nodes in place; returns {"rewritten": count, "kept": {node name: reason}}."""
    rewritten, kept = 0, {}
    for node in model.graph:
        if node.domain != ORT_DOMAIN or node.op_type != OP_TYPE:
            continue
        reason = why_not(node)
        if reason is not None:
            kept[node.name or f"#{rewritten + len(kept)}"] = reason
            continue
        node.domain = AQLM_DOMAIN
        rewritten += 1
    if rewritten:
        model.opset_imports.setdefault(AQLM_DOMAIN, 1)
    return {"rewritten": rewritten, "kept": kept}
