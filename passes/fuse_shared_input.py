"""fuse_shared_input: AQLM layers that read the same activation become one `aqlm.aqlm_gemm` (q/k/v, gate/up).

Matches: two or more `aqlm.aqlm_gemm` nodes with the same `x`, the same config (M, K, g) and all with or all
without bias (and not already fused).
Emits: `aten.cat` of their codes, codebooks (stacked: [P·M, K, 1, g]), scales (and biases), one `aqlm.aqlm_gemm`
with `partitions=[out_1, ..., out_P]`, and `aten.split_with_sizes` + `getitem` giving each original output back.
Why: one kernel call instead of P — x is read once and the per-call cost (runtime dispatch, argument checks,
thread-pool launch) is paid once; vLLM fuses AQLM q/k/v and gate/up the same way. The cats are of parameters only,
so ONNX Runtime folds them once at session creation (they are compressed tensors: nothing dense appears).
Where: second phase of `passes.pipeline`, after `lower_aqlm_linear`.
"""

from __future__ import annotations

import operator

import torch

from aqlm_compile import ops as _ops  # noqa: F401  (registers the aqlm ops)


def _fake(fn, nodes):
    """`fn` applied to the nodes' fake values, under their fake mode (the node's meta["val"] for the exporter)."""
    from torch._guards import detect_fake_mode

    vals = [n.meta["val"] for n in nodes]
    with detect_fake_mode(vals):
        return fn(vals)


def _key(node):
    x, codes, codebooks, scales = node.args[:4]
    bias = node.args[4] if len(node.args) > 4 else None
    partitions = node.args[5] if len(node.args) > 5 else node.kwargs.get("partitions")
    if partitions:
        return None
    cv, bv = codes.meta["val"], codebooks.meta["val"]
    return (x, tuple(cv.shape[1:]), cv.dtype, tuple(bv.shape), bv.dtype, scales.meta["val"].dtype, bias is None)


_CASTS = {torch.ops.aten.to.dtype, torch.ops.aten._to_copy.default, torch.ops.aten.to.dtype_layout}


def _source(node):
    """Look through dtype casts that change nothing (export keeps `bias.to(x.dtype)` as a node next to its use)."""
    while getattr(node, "target", None) in _CASTS and node.args[0].meta["val"].dtype == node.meta["val"].dtype:
        node = node.args[0]
    return node


def fuse_shared_input(ep, min_group: int = 2) -> dict:
    """Rewrite `ep` in place. Returns {"groups": [[layer output sizes...]...], "nodes_before", "nodes_after"}."""
    graph = ep.graph_module.graph
    gemm = torch.ops.aqlm.aqlm_gemm.default
    nodes = [n for n in graph.nodes if n.target is gemm]
    groups: dict = {}
    for n in nodes:
        key = _key(n)
        if key is not None:
            groups.setdefault(key, []).append(n)
    fused = []
    for members in groups.values():
        if len(members) < min_group:
            continue
        first = members[0]
        x = first.args[0]
        has_bias = len(first.args) > 4 and first.args[4] is not None
        order = {n: i for i, n in enumerate(graph.nodes)}
        sources = [[_source(m.args[i]) for m in members] for i in range(1, 5 if has_bias else 4)]
        if any(order[src] > order[first] for row in sources for src in row):
            continue  # an input is computed after the first member: leave this group alone
        sizes = [int(m.args[1].meta["val"].shape[0]) for m in members]
        with graph.inserting_before(first):
            cats = []
            for parts in sources:
                cat = graph.call_function(torch.ops.aten.cat.default, (parts, 0))
                cat.meta["val"] = _fake(lambda ts: torch.cat(ts, 0), parts)
                cats.append(cat)
            args = (x, *cats) if has_bias else (x, *cats, None)
            new = graph.call_function(gemm, args, {"partitions": sizes})
            new.meta = dict(first.meta)
            new.meta["val"] = first.meta["val"].new_empty((*first.meta["val"].shape[:-1], sum(sizes)))
            split = graph.call_function(torch.ops.aten.split_with_sizes.default, (new, sizes, -1))
            split.meta["val"] = list(torch.split(new.meta["val"], sizes, -1))
            for i, m in enumerate(members):
                item = graph.call_function(operator.getitem, (split, i))
                item.meta = dict(m.meta)
                item.meta["val"] = split.meta["val"][i]
                m.replace_all_uses_with(item)
        for m in members:
            graph.erase_node(m)
        for n in reversed(list(graph.nodes)):  # the no-op casts that fed the members, now unused
            if n.target in _CASTS and not n.users:
                graph.erase_node(n)
        fused.append(sizes)
    graph.lint()
    ep.graph_module.recompile()
    after = sum(1 for n in graph.nodes if n.target is gemm)
    return {"groups": fused, "nodes_before": len(nodes), "nodes_after": after}
