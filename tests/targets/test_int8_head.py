"""`build --head int8` (the default on CPU targets): the TVM route's lm_head (and the embedding tied to it) as int8 rows with a per-row scale —
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

    # fp32 prompt GEMMs: the logits are compared with PyTorch to 1e-4 (conftest.py `llama_art`)
    fp16 = build(tiny_llama_ckpt, "x86", BuildOptions(onnx=False, head="fp16", prefill="fp32"), tmp_path / "fp16")
    int8 = build(tiny_llama_ckpt, "x86", BuildOptions(head="int8", prefill="fp32"), tmp_path / "int8")  # + ONNX
    assert int8["tvm"]["head"].startswith("int8") and fp16["tvm"]["head"].startswith("fp16")
    sizes = [(tmp_path / name / "model_params.bin").stat().st_size for name in ("fp16", "int8")]
    assert sizes[1] < sizes[0]
    # `--head fp16`: the tied embedding / lm_head is one fp16 parameter, as the checkpoint stores it
    vocab = fp16["tvm"]["decoder"]["vocab_size"]
    tables = [p for p in TvmDecoder(tmp_path / "fp16").params if p.shape[0] == vocab and len(p.shape) == 2]
    assert len(tables) == 1 and str(tables[0].dtype) == "float16", [(p.shape, p.dtype) for p in tables]

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


def test_default_head_is_int8_on_cpu_targets_and_the_recorded_form_wins(tiny_llama_ckpt, tmp_path):
    """With no --head, `build` stores a dense lm_head as int8 rows on a CPU target (embedding.DEFAULT_HEAD), the
    manifest says so, and `generate --runtime torch` on the artifact computes with the same rows, so its logits are
    the TVM route's. A checkpoint that records its head form (`quantize --bits --head fp16`) keeps it; CUDA and an
    AQLM head keep fp16, and `--head int8 --target cuda` is refused in one line."""
    import json
    import shutil

    from click.testing import CliRunner

    from aqlm_compile.cli import main
    from aqlm_compile.embedding import default_head
    from aqlm_compile.nn import AqlmLinear
    from aqlm_compile.runtime.torch_runtime import TorchDecoder
    from aqlm_compile.runtime.tvm_runtime import TvmDecoder

    art = tmp_path / "art"
    r = CliRunner().invoke(main, ["build", str(tiny_llama_ckpt), "--target", "x86", "--no-onnx", "-o", str(art),
                                  "--prefill", "fp32"])  # compared with PyTorch to 1e-4
    assert r.exit_code == 0, r.output
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["head"] == "int8" and manifest["tvm"]["head"].startswith("int8")
    ids = np.array([1, 5, 9, 13, 17], np.int64)
    tvm_dec, torch_dec = TvmDecoder(art, threads=1), TorchDecoder(art, threads=1)
    for step in (ids, np.array([3]), np.array([7])):
        got, want = tvm_dec.step(step), torch_dec.step(step)
        assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max())
    # ... and differ from the checkpoint's own fp16 head: the rows are what was computed
    plain = TorchDecoder(tiny_llama_ckpt, threads=1)
    assert np.abs(plain.step(ids) - TorchDecoder(art, threads=1).step(ids)).max() > 0

    model, _, meta = fmt.load(tiny_llama_ckpt)
    assert "dense_head" not in meta and default_head(model) == "int8"
    assert default_head(model, "fp16") == "fp16" and default_head(model, "int8", device="cuda") == "fp16"
    aqlm_head = fmt.load(tiny_llama_ckpt)[0]
    aqlm_head.lm_head = AqlmLinear(aqlm_head.lm_head.in_features, aqlm_head.lm_head.out_features,
                                   config=next(iter(fmt.quantized_modules(aqlm_head).values())).config)
    assert default_head(aqlm_head) == "fp16"

    recorded = tmp_path / "recorded"
    shutil.copytree(tiny_llama_ckpt, recorded)
    config = json.loads((recorded / "config.json").read_text())
    config["aqlm_compile"]["dense_head"] = "fp16"
    (recorded / "config.json").write_text(json.dumps(config))
    r = CliRunner().invoke(main, ["build", str(recorded), "--target", "x86", "--no-onnx", "-o", str(tmp_path / "r")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "r" / "manifest.json").read_text())["head"] == "fp16"

    r = CliRunner().invoke(main, ["build", str(tiny_llama_ckpt), "--target", "cuda", "--head", "int8",
                                  "-o", str(tmp_path / "c")])
    assert r.exit_code == 2 and "--head int8: CPU targets only" in r.output, r.output
    assert not (tmp_path / "c").exists()
