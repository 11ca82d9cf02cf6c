"""lower_aqlm_linear: every AQLM linear of an exported program becomes one `aqlm.aqlm_gemm` node.

Matches: `w = aqlm.dequantize(codes, codebooks, scales)` (what `AqlmLinear` emits when exported), optionally
through dtype casts, feeding the weight input of `aten.linear(x, w, bias?)`.
Emits: `aqlm.aqlm_gemm(x, codes, codebooks, scales, bias?)`; the dequantize (and casts) are erased, so the graph
holds no dense weight for that layer.
Checks: the config read from the tensor shapes must be accepted by `supports(config)` (the build plan passes the
target's query of the kernel table, kernels/registry.py; the pass itself knows no target);
a layer whose config is unsupported, or a dequantize that feeds anything but a linear, is reported by layer name in
one error — never silently left dense.
Where: first phase of `passes.pipeline`, on the `torch.export` program, before fusion and before the ONNX or Relax
conversion.
"""

from __future__ import annotations

import torch

from aqlm_compile import ops as _ops  # noqa: F401  (registers the aqlm ops)
from aqlm_compile.config import AqlmConfig
from aqlm_compile.errors import ConfigError

_CASTS = {torch.ops.aten.to.dtype, torch.ops.aten._to_copy.default, torch.ops.aten.to.dtype_layout}
_CHECKS = {torch.ops.aten._assert_tensor_metadata.default}  # export's dtype assertions on the cast input


def layer_name(ep, codes_node, prefix: str = "") -> str:
    """`model.layers.0.self_attn.q_proj` for the codes placeholder of that layer (else the node's name);
    `prefix` is removed (the export wrapper's attribute name)."""
    fqn = ep.graph_signature.inputs_to_parameters.get(codes_node.name) if codes_node.op == "placeholder" else None
    if not (fqn and fqn.endswith(".codes")):
        return codes_node.name
    return fqn[len(prefix):-len(".codes")] if fqn.startswith(prefix) else fqn[: -len(".codes")]


def _shape(node):
    return tuple(node.meta["val"].shape)


def lower_aqlm_linear(ep, supports=lambda config: True, name_prefix: str = "") -> dict:
    """Rewrite `ep` in place. Returns {"lowered": [layer names], "configs": {name: config string}}."""
    graph = ep.graph_module.graph
    lowered, configs, problems = [], {}, []
    for dq in [n for n in graph.nodes if n.target is torch.ops.aqlm.dequantize.default]:
        codes, codebooks, scales = dq.args
        name = layer_name(ep, codes, name_prefix)
        try:
            config = AqlmConfig.from_shapes(_shape(codes), _shape(codebooks))
        except ConfigError as exc:
            problems.append(f"{name}: {exc}")
            continue
        if not supports(config):
            problems.append(f"{name}: config {config.name} has no kernel for this target")
            continue
        w, chain = dq, [dq]
        while True:
            checks = [u for u in w.users if u.target in _CHECKS]
            rest = [u for u in w.users if u.target not in _CHECKS]
            chain += checks
            if len(rest) == 1 and rest[0].target in _CASTS:
                w = rest[0]
                chain.append(w)
            else:
                break
        users = [u for u in w.users if u.target not in _CHECKS]
        chain += [u for u in w.users if u.target in _CHECKS]
        if not users or any(u.target is not torch.ops.aten.linear.default or u.args[1] is not w or w in u.args[:1]
                            for u in users):
            problems.append(f"{name}: its weight feeds {[str(u.target) for u in users]}, not only aten.linear")
            continue
        for lin in users:
            x, bias = lin.args[0], (lin.args[2] if len(lin.args) > 2 else None)
            with graph.inserting_before(lin):
                new = graph.call_function(torch.ops.aqlm.aqlm_gemm.default, (x, codes, codebooks, scales, bias))
            new.meta = dict(lin.meta)
            lin.replace_all_uses_with(new)
            graph.erase_node(lin)
        for n in sorted(set(chain), key=_order(graph), reverse=True):
            graph.erase_node(n)
        lowered.append(name)
        configs[name] = config.name
    if problems:
        raise ConfigError("lower_aqlm_linear: " + "; ".join(problems))
    graph.lint()
    ep.graph_module.recompile()
    return {"lowered": lowered, "configs": configs}


def _order(graph):
    index = {n: i for i, n in enumerate(graph.nodes)}
    return lambda n: index[n]
