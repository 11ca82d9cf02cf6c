"""fuse_shared_input before/after: q/k/v and gate/up of each block become one partitioned aqlm_gemm."""

import pytest
import torch

from aqlm_compile.export import example_inputs, export_decoder, load_for_export
from aqlm_compile.passes.fuse_shared_input import fuse_shared_input
from aqlm_compile.passes.lower_aqlm_linear import lower_aqlm_linear


def gemms(ep):
    return [n for n in ep.graph_module.graph.nodes if n.target is torch.ops.aqlm.aqlm_gemm.default]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: q/k/v carry biases, fused too
def test_before_after(arch, request):
    model, _ = load_for_export(request.getfixturevalue(f"tiny_{arch}_ckpt"))
    ep, spec = export_decoder(model)
    lower_aqlm_linear(ep)
    inputs = example_inputs(spec, seq=3, past=4)
    with torch.no_grad():
        before = ep.module()(*inputs)
    assert len(gemms(ep)) == 14
    report = fuse_shared_input(ep)
    nodes = gemms(ep)
    assert report["nodes_before"] == 14 and report["nodes_after"] == len(nodes) == 8  # per block: qkv, o, gate+up, down
    q_size = model.config.num_attention_heads * (model.config.hidden_size // model.config.num_attention_heads)
    kv_size = model.config.num_key_value_heads * (model.config.hidden_size // model.config.num_attention_heads)
    assert sorted(map(tuple, report["groups"])) == sorted(
        [(q_size, kv_size, kv_size)] * 2 + [(model.config.intermediate_size,) * 2] * 2)
    fused = [n for n in nodes if n.kwargs.get("partitions")]
    assert all(n.args[2].meta["val"].shape[0] == 2 * len(n.kwargs["partitions"]) for n in fused)  # P·M codebooks
    with torch.no_grad():
        after = ep.module()(*inputs)
    for a, b in zip(before, after):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-6)


def test_nothing_to_fuse_leaves_the_graph_alone(tiny_llama_ckpt):
    model, _ = load_for_export(tiny_llama_ckpt)
    ep, _ = export_decoder(model)
    lower_aqlm_linear(ep)
    report = fuse_shared_input(ep, min_group=4)  # no group of 4 layers shares an input
    assert report["groups"] == [] and report["nodes_after"] == 14
