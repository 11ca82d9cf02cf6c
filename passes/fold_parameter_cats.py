"""fold_parameter_cats: `aten.cat` of parameters only → one new parameter holding the concatenation.

Matches: `aten.cat` nodes whose inputs are all parameter placeholders of the exported program — the codes,
codebooks, scales (and biases) that `fuse_shared_input` concatenates for a fused q/k/v or gate/up layer.
Emits: one parameter placeholder per such cat (its tensor, the concatenation, in `ep.state_dict` under
`<first input's name>_cat<N>`), the cat's users re-pointed to it; parameters nothing else reads are dropped from the
graph, the signature and the state dict (a parameter another node still reads stays).
Why: the Relax route keeps parameters as function inputs, so a cat of parameters would be recomputed, and its
result allocated, on every call (ONNX Runtime folds such subgraphs once at session creation; the Relax VM does
not). Folded, a fused layer costs nothing more per call than an unfused one, and its codes are a parameter the
build can repack into another layout like any other (`targets/relax.py` `repack_codes`).
Where: third phase of `passes.pipeline`, after `fuse_shared_input`, for the routes that ask (`fold_cats=True`:
the Relax route).
"""

from __future__ import annotations

import torch
from torch.export.graph_signature import InputKind, InputSpec, TensorArgument


def _parameter_targets(ep) -> dict[str, str]:
    """{placeholder name: state_dict key} for the parameters of `ep`."""
    return {s.arg.name: s.target for s in ep.graph_signature.input_specs
            if s.kind == InputKind.PARAMETER and isinstance(s.arg, TensorArgument)}


def fold_parameter_cats(ep) -> dict:
    """Rewrite `ep` in place. Returns {"folded": [new parameter names], "dropped": [parameters removed]}."""
    graph = ep.graph_module.graph
    params = _parameter_targets(ep)
    specs = list(ep.graph_signature.input_specs)
    folded, dropped = [], []
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not torch.ops.aten.cat.default:
            continue
        inputs, dim = node.args[0], (node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0))
        if not inputs or not all(getattr(i, "op", None) == "placeholder" and i.name in params for i in inputs):
            continue
        value = torch.cat([ep.state_dict[params[i.name]] for i in inputs], dim).contiguous()
        # a sibling of the first input (`...q_proj.bias_cat3`): under it (`bias.cat3`) a re-trace would need an
        # attribute of a tensor
        target = f"{params[inputs[0].name]}_cat{len(folded)}"
        with graph.inserting_before(inputs[0]):
            new = graph.placeholder(f"{inputs[0].name}_cat{len(folded)}")
        new.meta = dict(node.meta)
        at = next(i for i, s in enumerate(specs) if s.arg.name == inputs[0].name)
        specs.insert(at, InputSpec(InputKind.PARAMETER, TensorArgument(name=new.name), target=target))
        ep.state_dict[target] = torch.nn.Parameter(value, requires_grad=False)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        params[new.name] = target
        folded.append(new.name)
        for old in dict.fromkeys(inputs):
            if not old.users:
                old_target = params.pop(old.name)
                graph.erase_node(old)
                specs = [s for s in specs if s.arg.name != old.name]
                if not any(s.target == old_target for s in specs):
                    del ep.state_dict[old_target]
                dropped.append(old.name)
    if folded:
        from torch.export.graph_signature import ExportGraphSignature

        ep._graph_signature = ExportGraphSignature(input_specs=specs,
                                                   output_specs=list(ep.graph_signature.output_specs))
        graph.lint()
        ep.graph_module.recompile()
    return {"folded": folded, "dropped": dropped}
