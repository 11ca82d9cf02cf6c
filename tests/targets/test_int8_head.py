"""`build --head int8`: the TVM route's lm_head (and the embedding tied to it) as int8 rows with a per-row scale —
the same logits as the PyTorch model whose head is those int8 rows times their scales, and a smaller params file."""

import numpy as np
import pytest
import torch

pytest.importorskip("tvm")

from aqlm_compile import format as fmt  # noqa: E402


def test_rows_int8_round_trip():
    from aqlm_compile.export import rows_int8

    w = torch.randn(7, 32) * torch.tensor([0.0, 1, 2, 3, 4, 5, 1e-3])[:, None]  # a zero row keeps scale 1
    w8, s = rows_int8(w)
    assert w8.dtype == torch.int8 and w8.abs().max() <= 127 and s[0] == 1
    assert ((w8.float() * s[:, None] - w).abs() <= s[:, None] / 2 + 1e-7).all()


def test_int8_head_artifact_matches_torch_with_that_head(tiny_llama_ckpt, tmp_path):
    from aqlm_compile.decoder import DecoderWithCache
    from aqlm_compile.export import rows_int8
    from aqlm_compile.runtime.tvm_runtime import TvmDecoder
    from aqlm_compile.targets.plan import build
    from aqlm_compile.targets.registry import BuildOptions

    fp16 = build(tiny_llama_ckpt, "x86", BuildOptions(onnx=False), tmp_path / "fp16")
    int8 = build(tiny_llama_ckpt, "x86", BuildOptions(head="int8"), tmp_path / "int8")  # + the ONNX route
    assert int8["tvm"]["head"].startswith("int8") and fp16["tvm"]["head"].startswith("fp16")
    sizes = [(tmp_path / name / "model_params.bin").stat().st_size for name in ("fp16", "int8")]
    assert sizes[1] < sizes[0]

    model, _, _ = fmt.load(tiny_llama_ckpt)
    model.config.use_cache = True
    w8, s = rows_int8(model.lm_head.weight)
    with torch.no_grad():
        model.lm_head.weight.copy_(w8.float() * s[:, None])  # tied: the embedding reads the same rows
    ids = np.array([1, 5, 9, 13, 17, 21, 25], np.int64)
    dec = TvmDecoder(tmp_path / "int8")
    got = [dec.step(ids), dec.step(np.array([3])), dec.step(np.array([7]))]
    wrapper = DecoderWithCache(model).eval()
    spec = wrapper.spec
    kv = [torch.zeros(1, spec.num_kv_heads, 0, spec.head_dim)] * (2 * spec.num_layers)
    want, length = [], 0
    for step in (ids, np.array([3]), np.array([7])):
        length += len(step)
        with torch.no_grad():
            out = wrapper(torch.from_numpy(step).reshape(1, -1), torch.ones(1, length, dtype=torch.int64), *kv)
        kv = list(out[1:])
        want.append(out[0][0].numpy())
    for g, w in zip(got, want):
        assert np.abs(g - w).max() <= 1e-4 * max(1.0, np.abs(w).max())

    # the ONNX route stores and computes the same head: one DenseMatMul on int8 rows + scales, run by the op library
    # (kernels/dense.py) and by the portable twin's standard ops
    import onnx

    from aqlm_compile.runtime.ort import OrtDecoder
    from aqlm_compile.targets.onnx import dense_nodes

    graph = onnx.load(str(tmp_path / "int8" / "onnx/model.onnx"))
    inits = {t.name: t for t in graph.graph.initializer}
    (node,) = dense_nodes(graph)
    assert inits[node.input[1]].data_type == onnx.TensorProto.INT8 and len(node.input) == 3
    assert int8["kernels"][f"aqlm_dense_{'x'.join(map(str, inits[node.input[1]].dims))}_i8"]["kernel"] == "dense"
    for kind in ("aqlm", "portable"):
        dec = OrtDecoder(tmp_path / "int8", kind=kind, threads=1)
        for step, w in zip((ids, np.array([3]), np.array([7])), want):
            g = dec.step(step)
            assert np.abs(g - w).max() <= 1e-4 * max(1.0, np.abs(w).max()), kind
