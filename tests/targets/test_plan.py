"""The build plan (targets/plan.py), the target registry and the kernel table: one load per build, the same kernel
choices as before the plan existed, a target and a kernel added by registration alone."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from tiny_models import greedy_tokens

pytest.importorskip("tvm")

from aqlm_compile import format as fmt  # noqa: E402
from aqlm_compile.cli import main  # noqa: E402
from aqlm_compile.errors import ConfigError  # noqa: E402

GOLDEN = Path(__file__).parent / "golden" / "tiny_llama_x86_kernels.json"


@pytest.fixture(scope="module")
def counted_build(tiny_llama_ckpt, tmp_path_factory):
    """A full x86 build (kernel library, ONNX route + ORT op library, Relax VM) with every checkpoint read counted."""
    from aqlm_compile.targets.plan import build
    from aqlm_compile.targets.registry import BuildOptions

    calls = {"load": 0, "validate": 0, "check_model": 0}
    originals = {name: getattr(fmt, name) for name in calls}

    def counting(name):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return originals[name](*args, **kwargs)
        return wrapper

    mp = pytest.MonkeyPatch()
    for name in calls:
        mp.setattr(fmt, name, counting(name))
    art = tmp_path_factory.mktemp("plan") / "art"
    try:
        # fp32 prompt GEMMs: the golden kernel table predates the int8 one (chosen where the host has VNNI:
        # tests/kernels/test_gemm_vnni.py), and the tokens below are checked against PyTorch exactly
        manifest = build(tiny_llama_ckpt, "x86", BuildOptions(prefill="fp32"), art)
    finally:
        mp.undo()
    return art, manifest, calls


def test_a_build_loads_and_validates_the_checkpoint_once(counted_build):
    art, manifest, calls = counted_build
    assert calls == {"load": 1, "validate": 1, "check_model": 0}, calls
    assert {"onnx", "tvm"} <= set(manifest) and (art / "libaqlm_ort.so").is_file() and (art / "model_x86.so").is_file()


def test_kernel_choices_are_those_of_the_build_before_the_plan(counted_build):
    """The tiny Llama's x86 kernel library: every symbol, its kernel and reason exactly as the hand-assembled x86
    recipe chose them (recorded from that build, tests/targets/golden/)."""
    _, manifest, _ = counted_build
    golden = json.loads(GOLDEN.read_text())["kernels"]
    got = {s: {k: v[k] for k in ("kernel", "reason", "batch", "out_features", "in_features", "partitions") if k in v}
           for s, v in manifest["kernels"].items()
           if v["kernel"] not in ("dense", "silu_mul_halves") and "heads" not in v}
    assert got == golden
    # added since: the ONNX route's lm_head (aqlm.DenseMatMul) gets the dense kernel of its rows — int8, `build`'s
    # default form of a dense head
    dense = {s: v for s, v in manifest["kernels"].items() if v["kernel"] == "dense"}
    vocab = manifest["onnx"]["decoder"]["vocab_size"]
    assert [(v["out_features"], v["weight_dtype"]) for v in dense.values()] == [(vocab, "int8")], dense
    # added since: the ONNX route's attention (aqlm.GroupQueryAttention, build's default --ort-attention aqlm) gets
    # the three kernels of its one (heads, kv heads, head dim, scale)
    attention = {v["kernel"] for v in manifest["kernels"].values() if "heads" in v}
    assert attention == {"rope_kv_append", "decode_attention", "causal_attention"}
    assert manifest["onnx"]["attention"] == "aqlm.GroupQueryAttention"
    # added since: the gated MLP over the fused gate/up output (aqlm.SiluMulHalves) gets its two kernels per width
    silu_mul = {s: (v["half"], v["batch"]) for s, v in manifest["kernels"].items() if v["kernel"] == "silu_mul_halves"}
    assert silu_mul == {"aqlm_silu_mul_halves_128_r1": (128, 1), "aqlm_silu_mul_halves_128": (128, "any")}
    # the Relax route's kernels came from the same table
    assert {v["kernel"] for v in manifest["tvm"]["kernels"].values()} == {"gemv_direct", "gemm_decode"}


def test_plan_artifact_generates_the_torch_tokens(counted_build, tiny_llama_ckpt):
    art, _, _ = counted_build
    want = greedy_tokens(art, "torch")  # PyTorch on the model as the artifact stores it (its int8 head rows)
    assert greedy_tokens(art, "tvm") == want
    assert greedy_tokens(art, "ort") == want


def test_a_toy_target_needs_only_its_registration(tiny_llama_ckpt, tmp_path):
    """A second x86 variant (AVX2 code, its own name, the whole-model route only), registered from the test: the CLI
    lists it and builds it, and the artifact runs — nothing outside the registration was edited."""
    from aqlm_compile.runtime.kernels import KernelLibrary
    from aqlm_compile.targets.registry import register_target, unregister_target
    from aqlm_compile.targets.x86 import X86, x86_target

    toy = dataclasses.replace(
        X86, name="x86-haswell-toy", summary="test: AVX2 only", routes=("tvm",), dense_baseline=False,
        tvm_target=lambda options: x86_target("avx2"),
        target_spec=lambda t, options: {"kind": "llvm", "mcpu": str(t.attrs["mcpu"]), "mtriple": "x86_64-linux-gnu"})
    register_target(toy)
    try:
        r = CliRunner().invoke(main, ["build", str(tiny_llama_ckpt), "--target", toy.name, "-o", str(tmp_path / "a")])
        assert r.exit_code == 0, r.output
        manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
        assert manifest["target"] == toy.name and manifest["target_spec"]["mcpu"] == "haswell"
        assert "onnx" not in manifest and (tmp_path / "a" / f"model_{toy.name}.so").is_file()
        assert greedy_tokens(tmp_path / "a", "tvm") == greedy_tokens(tiny_llama_ckpt, "torch")
        model, _, _ = fmt.load(tiny_llama_ckpt)
        layer = dict(model.named_modules())["model.layers.0.mlp.down_proj"]
        x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            ref = layer(x).double()
        y = torch.from_numpy(KernelLibrary(tmp_path / "a").linear("model.layers.0.mlp.down_proj", x.numpy())).double()
        assert ((y - ref).abs().max() / ref.abs().max()).item() <= 1e-5
    finally:
        unregister_target(toy.name)
    r = CliRunner().invoke(main, ["build", str(tiny_llama_ckpt), "--target", toy.name])
    assert r.exit_code == 2 and "Invalid value for '--target'" in r.output


def test_registering_a_kernel_changes_the_choice_everywhere():
    """A kernel spec registered ahead of the table's GEMVs wins where it applies, in the kernel library's choices;
    `select_kernel` explains why none applies when none does."""
    from aqlm_compile.config import AqlmConfig
    from aqlm_compile.kernels import registry
    from aqlm_compile.kernels.gemv_direct import GemvShape, gemv_direct
    from aqlm_compile.targets.common import kernel_module

    spec = registry.KernelSpec("toy_gemv_b1", ("llvm",), "test: batch 1 only",
                               lambda shape, layouts: None if shape.batch == 1 else "batch 1 only",
                               lambda shape, name, dynamic_tokens=False: gemv_direct(shape, name=name))
    registry.register_kernel(spec, before="gemv_lut_grouped")
    try:
        _, kernels = kernel_module(AqlmConfig.parse("2x8g8"), {"l": (64, 64)}, "llvm", max_batch=2)
        assert kernels["aqlm_gemv_64x64_b1"]["kernel"] == "toy_gemv_b1"
        assert kernels["aqlm_gemv_64x64_b2"]["kernel"] == "gemv_direct"
        assert kernels["aqlm_gemm_64x64"]["kernel"] == "gemm_decode"
        with pytest.raises(ConfigError, match="already registered"):
            registry.register_kernel(spec)
    finally:
        registry.KERNELS.remove(spec)
    assert registry.supports(AqlmConfig.parse("1x16g8"), "llvm") and registry.supports(AqlmConfig.parse("2x8g8"), "cuda")
    with pytest.raises(ConfigError, match="gemv_cuda: batch 9: CUDA has the GEMV kernel only"):
        registry.select_kernel(GemvShape(64, 64, AqlmConfig.parse("2x8g8"), 9), "cuda")
    prefill = registry.select_kernel(GemvShape(64, 64, AqlmConfig.parse("2x8g8"), 9), "cuda", graph_level=True)
    assert prefill.name == "relax_dequantize_matmul" and prefill.graph_level


def test_config_is_read_from_tensor_shapes_in_one_place():
    from aqlm_compile.config import AqlmConfig

    assert AqlmConfig.from_shapes((128, 8, 2), (2, 256, 1, 8)).name == "2x8g8"
    assert AqlmConfig.from_shapes((128, 8, 1), (3, 65536, 1, 8)).name == "1x16g8"  # fused: P·M codebooks
    for codes, books, message in (((128, 8, 2), (3, 256, 1, 8), "disagree on M"),
                                  ((128, 8, 2), (2, 200, 1, 8), "not a power of two"),
                                  ((128, 8), (2, 256, 1, 8), "expected codes")):
        with pytest.raises(ConfigError, match=message):
            AqlmConfig.from_shapes(codes, books)


def test_unsupported_config_is_refused_by_the_lowering_with_the_target_query(tiny_llama_ckpt):
    """The pass knows no target: the plan hands it the target's kernel-table query."""
    from aqlm_compile.targets.plan import export_graphs
    from aqlm_compile.targets.registry import BuildOptions

    model, _, _ = fmt.load(tiny_llama_ckpt)
    with pytest.raises(ConfigError, match="has no kernel for this target"):
        export_graphs(model, ("onnx",), BuildOptions(), supports=lambda config: config.num_codebooks != 2)


def test_a_target_that_refuses_a_config_fails_before_writing(tiny_llama_ckpt, tmp_path):
    """`Target.accepts_config` narrows what the kernel table supports: every refused layer is named, nothing written."""
    from aqlm_compile.targets.plan import build
    from aqlm_compile.targets.registry import BuildOptions
    from aqlm_compile.targets.x86 import X86

    picky = dataclasses.replace(X86, name="x86-no-2x8", accepts_config=lambda c: "no 2x8" if c.name == "2x8g8" else None)
    with pytest.raises(ConfigError, match=r"model\.layers\.0\.self_attn\.q_proj: config 2x8g8 has no kernel"):
        build(tiny_llama_ckpt, picky, BuildOptions(onnx=False), tmp_path / "a")
    assert not (tmp_path / "a").exists()


def test_bad_target_options_name_the_targets_that_take_them(tiny_llama_ckpt, tmp_path):
    r = CliRunner().invoke(main, ["build", str(tiny_llama_ckpt), "--target", "arm64", "--dense-model", str(tmp_path),
                                  "-o", str(tmp_path / "a")])
    assert r.exit_code == 2 and "--dense/--dense-model is for --target x86" in r.output
    assert not (tmp_path / "a").exists()
    from aqlm_compile.targets.registry import target_names

    assert {"x86", "arm64", "cuda"} <= set(target_names())
