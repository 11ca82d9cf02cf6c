"""fold_parameter_cats before/after: the fused layers' parameter cats become parameters; outputs unchanged."""

import torch

from aqlm_compile.export import example_inputs, export_decoder, load_for_export
from aqlm_compile.passes.fold_parameter_cats import fold_parameter_cats
from aqlm_compile.passes.fuse_shared_input import fuse_shared_input
from aqlm_compile.passes.lower_aqlm_linear import lower_aqlm_linear


def param_cats(ep):
    params = {s.arg.name for s in ep.graph_signature.input_specs if s.kind.name == "PARAMETER"}
    return [n for n in ep.graph_module.graph.nodes if n.target is torch.ops.aten.cat.default
            and all(getattr(i, "name", None) in params for i in n.args[0])]


def test_before_after(tiny_llama_ckpt):
    model, _ = load_for_export(tiny_llama_ckpt)
    ep, spec = export_decoder(model)
    lower_aqlm_linear(ep)
    fuse_shared_input(ep)
    inputs = example_inputs(spec, seq=3, past=4)
    with torch.no_grad():
        before = ep.module()(*inputs)
    cats = param_cats(ep)
    assert len(cats) == 2 * 2 * 3  # 2 blocks × (q/k/v, gate/up) × (codes, codebooks, scales)
    params_before = len(ep.state_dict)
    expected = {n.meta["val"].shape for n in cats}

    report = fold_parameter_cats(ep)

    assert len(report["folded"]) == 12 and param_cats(ep) == []
    assert len(report["dropped"]) == 2 * (3 + 2) * 3  # every fused layer's own codes, codebooks, scales
    assert len(ep.state_dict) == params_before + 12 - len(report["dropped"])
    specs = {s.arg.name: s.target for s in ep.graph_signature.input_specs}
    assert {ep.state_dict[specs[name]].shape for name in report["folded"]} == expected
    placeholders = [n.name for n in ep.graph_module.graph.nodes if n.op == "placeholder"]
    assert placeholders == [s.arg.name for s in ep.graph_signature.input_specs]  # order kept
    with torch.no_grad():
        after = ep.module()(*inputs)
    for a, b in zip(before, after):
        assert torch.equal(a, b)
    # the Relax importer decomposes the program again: the new parameters must survive a re-trace
    ep.run_decompositions()


def test_cat_of_a_non_parameter_is_left_alone(tiny_llama_ckpt):
    model, _ = load_for_export(tiny_llama_ckpt)
    ep, _ = export_decoder(model)
    lower_aqlm_linear(ep)  # no fused layers: the only cats are of activations (the KV cache)
    cats = [n for n in ep.graph_module.graph.nodes if n.target is torch.ops.aten.cat.default]
    assert cats
    assert fold_parameter_cats(ep) == {"folded": [], "dropped": []}
    assert [n for n in ep.graph_module.graph.nodes if n.target is torch.ops.aten.cat.default] == cats
