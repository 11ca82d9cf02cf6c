"""The ONNX route's attention: `export.attention_ops_for_onnx` traces each eligible layer as `aqlm.gqa_attention`,
written as ORT's GroupQueryAttention (targets/onnx.py). The op's math against HF's attention, the exported graph
in ONNX Runtime against torch (prefill, decode, a chunk after a cache), and the layers it must leave alone."""

import numpy as np
import onnx
import pytest
import torch
from tiny_models import make_model

from aqlm_compile.decoder import DecoderWithCache
from aqlm_compile.export import attention_ops_for_onnx, export_decoder, gqa_eligible
from aqlm_compile.models import load_fp_model

STEPS = (7, 1, 3, 1)  # prefill, decode, a 3-token chunk after the cache, decode


def fp_model(tmp_path, arch, **overrides):
    model, _ = load_fp_model(make_model(tmp_path / arch, arch, **overrides))
    model.eval()
    model.config.use_cache = True
    return model


def run_steps(call, spec):
    past = [np.zeros((1, spec.num_kv_heads, 0, spec.head_dim), np.float32)] * (2 * spec.num_layers)
    logits = []
    for i, n in enumerate(STEPS):
        ids = np.random.default_rng(i).integers(0, spec.vocab_size, (1, n))
        out = call(ids, np.ones((1, past[0].shape[2] + n), np.int64), past)
        logits.append(out[0])
        past = out[1:]
    return logits, past


def torch_call(wrap):
    def call(ids, mask, past):
        with torch.no_grad():
            out = wrap(torch.from_numpy(ids), torch.from_numpy(mask), *map(torch.from_numpy, past))
        return [t.numpy() for t in out]
    return call


@pytest.mark.parametrize("arch, overrides", [
    ("llama", {}), ("qwen2", {}),
    ("llama", {"num_key_value_heads": 4}),  # MHA
    ("llama", {"head_dim": 32}),  # head_dim != hidden / heads
    ("llama", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                   "original_max_position_embeddings": 32}}),  # attention scaling != 1
    ("llama", {"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 500000.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 32}}),
])
def test_op_computes_what_hf_attention_does(arch, overrides, tmp_path):
    from aqlm_compile import export

    model = fp_model(tmp_path, arch, **overrides)
    wrap = DecoderWithCache(model)
    want, want_kv = run_steps(torch_call(wrap), wrap.spec)
    with attention_ops_for_onnx(model):
        assert all(layer.self_attn.forward.__func__ is export._attention_gqa for layer in model.model.layers)
        got, got_kv = run_steps(torch_call(wrap), wrap.spec)
    for a, b in zip(got + got_kv, want + want_kv):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    # restored: the class's forward, no rotary table left on the model
    assert all("forward" not in layer.self_attn.__dict__ for layer in model.model.layers)
    assert "forward" not in model.model.__dict__ and not hasattr(model.model, "aqlm_rope_cos")


def test_sliding_window_and_qk_norm_layers_keep_their_traced_form(tmp_path):
    windowed = fp_model(tmp_path, "mistral")  # transformers' default: a 4096-token window
    assert gqa_eligible(windowed.model.layers[0].self_attn, windowed.config) == "sliding window 4096"
    plain = fp_model(tmp_path / "plain", "mistral", sliding_window=None)
    assert gqa_eligible(plain.model.layers[0].self_attn, plain.config) is None
    attn = plain.model.layers[0].self_attn
    attn.q_norm = torch.nn.Identity()
    assert gqa_eligible(attn, plain.config) == "has q_norm"
    # a look-alike class is not taken on its attributes (SmolLM3, Cohere, OLMo... differ inside their forward)
    llama = fp_model(tmp_path, "llama")
    lookalike = type("OtherAttention", (type(llama.model.layers[0].self_attn),), {})
    llama.model.layers[0].self_attn.__class__ = lookalike
    assert gqa_eligible(llama.model.layers[0].self_attn, llama.config) == "attention class OtherAttention"
    narrow = fp_model(tmp_path / "narrow", "llama", head_dim=8)
    assert "multiple of 16" in gqa_eligible(narrow.model.layers[0].self_attn, narrow.config)


@pytest.mark.parametrize("arch, gqa", [("llama", True), ("qwen2", False)])
def test_exported_graph_in_ort_matches_torch(arch, gqa, tmp_path):
    import onnxruntime as ort

    from aqlm_compile.targets.onnx import export_onnx, gqa_nodes

    model = fp_model(tmp_path, arch)
    if not gqa:  # a layer the op does not cover (say, with a q/k norm) keeps its traced attention
        for layer in model.model.layers:
            layer.self_attn.q_norm = torch.nn.Identity()
    from aqlm_compile.targets.onnx import rotary_positions

    wrap = DecoderWithCache(model)
    want, want_kv = run_steps(torch_call(wrap), wrap.spec)
    with attention_ops_for_onnx(model):
        ep, spec = export_decoder(model)
    proto = export_onnx(ep, spec, tmp_path / "model.onnx")
    layers = model.config.num_hidden_layers
    assert len(gqa_nodes(proto)) == (layers if gqa else 0)
    assert rotary_positions(proto) == (model.config.max_position_embeddings if gqa else None)
    ops = {n.op_type for n in proto.graph.node}
    assert ("Softmax" in ops) != gqa  # the traced attention is gone exactly when the op replaced it
    # every norm after a residual add is one SkipSimplifiedLayerNormalization (passes/skip_rms_norm_for_ort.py)
    assert sum(n.op_type == "SkipSimplifiedLayerNormalization" for n in proto.graph.node) == 2 * layers
    sess = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    got, got_kv = run_steps(lambda ids, mask, past: sess.run(None, dict(zip(names, [ids, mask, *past]))), spec)
    for a, b in zip(got + got_kv, want + want_kv):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)
    onnx.checker.check_model(proto)
