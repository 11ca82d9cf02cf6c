"""`aqlm-compile build --target x86|arm64|cuda`: artifact folders whose kernels reproduce the checkpoint's layers."""

import json

import numpy as np
import pytest
from conftest import require_arm64_toolchain
import torch
from click.testing import CliRunner
from tiny_models import greedy_tokens, tamper, torch_prefill_logits

tvm = pytest.importorskip("tvm")

from aqlm_compile import format as fmt  # noqa: E402
from aqlm_compile.cli import main  # noqa: E402
from aqlm_compile.errors import ConfigError, FormatError  # noqa: E402
from aqlm_compile.kernels.gemm_vnni import REQUIRED_FEATURES as VNNI_FEATURES  # noqa: E402
from aqlm_compile.runtime.kernels import KernelLibrary  # noqa: E402
from aqlm_compile.targets.common import target_features  # noqa: E402
from aqlm_compile.targets.x86 import x86_target  # noqa: E402


@pytest.fixture(scope="module")
def built(tiny_llama, tiny_corpus, tmp_path_factory):
    from aqlm_compile.jobs import quantize_job

    root = tmp_path_factory.mktemp("build")
    ckpt = root / "ckpt"
    quantize_job(str(tiny_llama), str(ckpt), config="2x8g8", dataset=str(tiny_corpus), preset="tiny", device="cpu",
                 overrides={"kmeans_iters": 3, "max_rounds": 1})
    r = CliRunner().invoke(main, ["build", str(ckpt), "--target", "x86", "-o", str(root / "art"), "--no-onnx", "--no-tvm"])
    assert r.exit_code == 0, r.output
    return ckpt, root / "art"


def test_artifact_layers_match_checkpoint(built):
    ckpt, art = built
    model, _, _ = fmt.load(ckpt)
    lib = KernelLibrary(art)
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["target"] == "x86" and manifest["aqlm_config"] == "2x8g8"
    assert "kernels_x86.so" in manifest["files"] and "weights/model.safetensors" in manifest["files"]
    modules = dict(model.named_modules())
    # the prompt GEMM (> 8 tokens) is int8 where the host has AVX-512 VNNI (`build --prefill int8`, the default):
    # within int8 rounding of PyTorch; its exact arithmetic is checked in test_gemm_vnni.py
    int8 = any(v["kernel"].startswith("gemm_vnni") for v in manifest["kernels"].values())
    assert int8 == (frozenset(VNNI_FEATURES) <= target_features(x86_target()))
    for layer in ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]:
        for batch in (1, 5, 9, 33):  # GEMV for ≤ 8 tokens, the prefill GEMM above
            x = torch.randn(batch, modules[layer].in_features, generator=torch.Generator().manual_seed(batch))
            with torch.no_grad():
                ref = modules[layer](x.double().float()).double()
            y = torch.from_numpy(lib.linear(layer, x.numpy())).double()
            assert ((y - ref).abs().max() / ref.abs().max()).item() <= (3e-2 if int8 and batch > 8 else 1e-5)


def test_artifact_bad_inputs(built):
    _, art = built
    lib = KernelLibrary(art)
    with pytest.raises(ConfigError, match=r"expected float32 \[N, 64\], found float64"):
        lib.linear("model.layers.0.self_attn.q_proj", np.zeros((1, 64)))
    with pytest.raises(ConfigError, match="at least one row"):
        lib.linear("model.layers.0.self_attn.q_proj", np.zeros((0, 64), np.float32))
    with pytest.raises(ConfigError, match="not in"):
        lib.linear("model.layers.7.nope", np.zeros((1, 64), np.float32))


def test_tampered_file_and_arch_mismatch(built, tmp_path):
    import shutil

    _, art = built
    copy = tmp_path / "art"
    shutil.copytree(art, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["arch"] = "aarch64"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FormatError, match="arch: built for aarch64"):
        KernelLibrary(copy)
    shutil.copy2(art / "manifest.json", copy / "manifest.json")
    tamper(copy / "kernels_x86.so")
    with pytest.raises(FormatError, match="kernels_x86.so: sha256 does not match"):
        KernelLibrary(copy)


def test_bad_build_requests_are_clear(built, tmp_path):
    ckpt, _ = built
    for args, message in ((["--target", "riscv"], "Invalid value for '--target'"),
                          (["--target", "x86", "--arch", "sm_90"], "--arch is for --target cuda"),
                          (["--target", "cuda", "--cpu", "znver4"], "--cpu is for --target x86/arm64"),
                          (["--target", "cuda", "--arch", "volta"], "--arch 'volta': expected sm_XY"),
                          (["--target", "x86", "--max-batch", "9"], "--max-batch 9: expected 1..8"),
                          (["--target", "x86", "--cpu", "native"], "--cpu native: name the CPU")):
        r = CliRunner().invoke(main, ["build", str(ckpt), "-o", str(tmp_path / "a"), *args])
        assert r.exit_code == 2 and message in r.output, (args, r.output)
        assert not (tmp_path / "a").exists()
    r = CliRunner().invoke(main, ["build", str(tmp_path / "missing"), "--target", "x86"])
    assert r.exit_code == 2 and "missing" in r.output


def test_bad_checkpoint_tensors_are_clear(built, tmp_path):
    """A wrong dtype or shape in the checkpoint stops the build with the tensor named, before anything compiles."""
    import shutil

    from safetensors.torch import load_file, save_file

    ckpt, _ = built
    for change, message in ((lambda t: t.float(), "expected int8"), (lambda t: t[:, :-1], "expected [64, 8, 2] for a 64->64 layer")):
        bad = tmp_path / f"bad{len(list(tmp_path.iterdir()))}"
        shutil.copytree(ckpt, bad)
        tensors = load_file(str(bad / "model.safetensors"))
        name = "model.layers.0.self_attn.q_proj.codes"
        tensors[name] = change(tensors[name]).contiguous()
        save_file(tensors, str(bad / "model.safetensors"))
        r = CliRunner().invoke(main, ["build", str(bad), "--target", "x86", "-o", str(tmp_path / "out")])
        assert r.exit_code == 2 and name in r.output and message in r.output, r.output
        assert not (tmp_path / "out").exists()


def test_missing_cross_toolchain_is_clear(built, tmp_path, monkeypatch):
    import shutil as sh

    ckpt, _ = built
    real_which = sh.which
    monkeypatch.setattr(sh, "which", lambda name, *a, **k: None if "aarch64" in name else real_which(name, *a, **k))
    r = CliRunner().invoke(main, ["build", str(ckpt), "--target", "arm64", "-o", str(tmp_path / "a")])
    assert r.exit_code == 2 and "aarch64-linux-gnu" in r.output and "setup.sh" in r.output, r.output
    assert not (tmp_path / "a").exists()


def test_arm64_artifact_runs_under_qemu(built, tmp_path):
    """Cross-compiled with gcc-aarch64-linux-gnu, run by the artifact's own aarch64 runner under qemu-user."""
    import shutil

    require_arm64_toolchain()
    from aqlm_compile.targets.arm64 import run_kernel

    ckpt, _ = built
    art = tmp_path / "arm"
    r = CliRunner().invoke(main, ["build", str(ckpt), "--target", "arm64", "-o", str(art)])
    assert r.exit_code == 0, r.output
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["arch"] == "aarch64" and "runtime/aqlm_run" in manifest["files"]
    assert open(art / "kernels_arm64.so", "rb").read(20)[18] == 183  # ELF e_machine EM_AARCH64
    # the ORT op library, cross-built for aarch64, exporting the entry point ORT looks up
    assert open(art / "libaqlm_ort.so", "rb").read(20)[18] == 183
    import subprocess
    symbols = subprocess.run(["aarch64-linux-gnu-nm", "-D", "--defined-only", str(art / "libaqlm_ort.so")],
                             capture_output=True, text=True, check=True).stdout
    assert " T RegisterCustomOps" in symbols
    assert {"onnx/model.onnx", "onnx/model.portable.onnx", "libaqlm_ort.so"} <= set(manifest["files"])
    with pytest.raises(FormatError, match="arch: built for aarch64"):
        KernelLibrary(art)  # an arm64 artifact on this x86 machine is a clear error
    model, _, _ = fmt.load(ckpt)
    layer = dict(model.named_modules())["model.layers.1.mlp.up_proj"]
    x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = layer(x).double()
    cb = layer.codebooks.detach().reshape(layer.codebooks.shape[0], layer.codebooks.shape[1], -1).half().numpy()
    y = run_kernel(art, f"aqlm_gemv_{layer.out_features}x{layer.in_features}_b3",
                   [x.numpy(), layer.codes.numpy(), cb, layer.scales.detach().reshape(-1).numpy(),
                    np.zeros(layer.out_features, np.float32)], (3, layer.out_features))
    assert ((torch.from_numpy(y).double() - ref).abs().max() / ref.abs().max()).item() <= 1e-5
    # The aarch64 ORT op library, run by ONNX Runtime itself (its aarch64 libonnxruntime, through the C API) under
    # qemu-user on a one-node AqlmMatMul model of this layer: x [1, 3, in] -> the 3-token GEMV kernel.
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from aqlm_compile.targets.arm64 import run_ort_model

    cfg = manifest["quantization_config"]
    node = helper.make_node("AqlmMatMul", ["x", "codes", "codebooks", "scales"], ["y"], domain="aqlm",
                            num_codebooks=cfg["num_codebooks"], nbits_per_codebook=cfg["nbits_per_codebook"],
                            in_group_size=cfg["in_group_size"], out_group_size=1)
    graph = helper.make_graph(
        [node], "layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, None, layer.in_features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, None, layer.out_features])],
        [numpy_helper.from_array(layer.codes.numpy(), "codes"),
         numpy_helper.from_array(layer.codebooks.detach().half().numpy(), "codebooks"),
         numpy_helper.from_array(layer.scales.detach().half().numpy(), "scales")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("aqlm", 1)],
                                ir_version=10), str(tmp_path / "layer.onnx"))
    y_ort = run_ort_model(art, tmp_path / "layer.onnx", x.numpy()[None])
    assert y_ort.shape == (1, 3, layer.out_features)
    assert ((torch.from_numpy(y_ort[0]).double() - ref).abs().max() / ref.abs().max()).item() <= 1e-5
    # The whole model: `generate --runtime tvm` runs the aarch64 Relax VM library through the artifact's
    # runtime/aqlm_vm_run under qemu-user, and gives the PyTorch AQLM model's greedy tokens.
    assert manifest["tvm"]["runner"] == "runtime/aqlm_vm_run" and "model_arm64.so" in manifest["files"]
    assert open(art / "model_arm64.so", "rb").read(20)[18] == 183
    tvm_tokens, torch_tokens = greedy_tokens(art, "tvm"), greedy_tokens(art, "torch")  # torch: the stored head
    assert len(tvm_tokens) == 8 and tvm_tokens == torch_tokens, (tvm_tokens, torch_tokens)
    from aqlm_compile.runtime.emulated import RunnerTvmDecoder

    dec = RunnerTvmDecoder(art)
    with pytest.raises(ValueError, match="token ids: expected 0"):
        dec.step(np.array([10**9]))  # an id past the vocabulary: a clear error before it reaches the VM
    assert dec.step(np.array([1, 2, 3])).shape == (dec.vocab_size,)  # and the runner is still serving
    dec.close()


def _nvcc_or_skip():
    from aqlm_compile.targets.cuda import find_nvcc

    try:
        return find_nvcc()
    except ConfigError as exc:
        pytest.skip(f"no CUDA toolkit on this machine: {exc}")


@pytest.fixture(scope="module")
def cuda_artifact(built, tmp_path_factory):
    _nvcc_or_skip()
    ckpt, _ = built
    art = tmp_path_factory.mktemp("cuda") / "art"
    # two of the default four archs (targets/cuda.py ARCHS): the fat-binary checks are the same, at half the nvcc time
    r = CliRunner().invoke(main, ["build", str(ckpt), "--target", "cuda", "--max-batch", "2", "--arch", "sm_80,sm_90",
                                  "-o", str(art)])
    assert r.exit_code == 0, r.output
    return art


def test_cuda_artifact_embeds_sass_for_every_arch_and_ptx(cuda_artifact):
    """Built with no GPU and no driver: the library must hold real device code, checked from the file itself
    (fat-binary entries and each cubin's own ELF header), never a source-only module."""
    from aqlm_compile.targets.cuda import device_code_inventory

    manifest = json.loads((cuda_artifact / "manifest.json").read_text())
    assert manifest["target"] == "cuda" and manifest["target_spec"]["archs"] == ["sm_80", "sm_90"]
    inv = device_code_inventory(cuda_artifact / "kernels_cuda.so")
    sass = sorted((e["sm"], e.get("elf_sm")) for e in inv if e["kind"] == "sass")
    assert sass == [(80, 80), (90, 90)]
    assert [e["sm"] for e in inv if e["kind"] == "ptx"] == [90]
    assert sum(k["kernel"] == "gemv_cuda" for k in manifest["kernels"].values()) == len(manifest["kernels"])
    # the whole model for the Relax VM: device code for every arch too
    assert manifest["tvm"]["library"] == "model_cuda.so" and manifest["tvm"]["device"] == "cuda"
    inv = device_code_inventory(cuda_artifact / "model_cuda.so")
    assert sorted({e["sm"] for e in inv if e["kind"] == "sass"}) == [80, 90]


def test_device_code_check_rejects_libraries_without_it(built, tmp_path):
    from aqlm_compile.targets.cuda import check_device_code

    _, art = built
    with pytest.raises(FormatError, match="no CUDA device code embedded"):
        check_device_code(art / "kernels_x86.so")
    _nvcc_or_skip()
    from aqlm_compile.targets.cuda import nvcc_fatbin

    blob = tmp_path / "sm80.fatbin"
    blob.write_bytes(nvcc_fatbin('extern "C" __global__ void f(float* y) { y[0] = 1.f; }', ("sm_80",), None))
    with pytest.raises(FormatError, match=r"no SASS for sm_86 \(found sm \[80\]\)"):
        check_device_code(blob)


def test_cuda_artifact_runs_on_a_gpu(cuda_artifact, built):
    """Numerics on a real GPU; on a machine without one this test says so and skips (never a silent pass)."""
    from aqlm_compile.targets.cuda import ensure_cuda_codegen

    if ensure_cuda_codegen() != "driver" or not tvm.cuda().exist:
        pytest.skip("no NVIDIA GPU/driver on this machine: the CUDA kernels were built and their cubins checked, "
                    "not run")
    ckpt, _ = built
    model, _, _ = fmt.load(ckpt)
    layer = dict(model.named_modules())["model.layers.0.mlp.gate_proj"]
    mod = tvm.runtime.load_module(str(cuda_artifact / "kernels_cuda.so"))
    dev = tvm.cuda()
    cb = layer.codebooks.detach().reshape(layer.codebooks.shape[0], layer.codebooks.shape[1], -1).half().numpy()
    for batch in (1, 2):
        x = torch.randn(batch, layer.in_features, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            ref = layer(x).double()
        args = [tvm.runtime.tensor(np.ascontiguousarray(a), dev) for a in
                (x.numpy(), layer.codes.numpy(), cb, layer.scales.detach().reshape(-1).numpy(),
                 np.zeros(layer.out_features, np.float32))]
        y = tvm.runtime.empty((batch, layer.out_features), "float32", dev)
        mod[f"aqlm_gemv_{layer.out_features}x{layer.in_features}_b{batch}"](*args, y)
        assert ((torch.from_numpy(y.numpy()).double() - ref).abs().max() / ref.abs().max()).item() <= 1e-5
    # the whole model on the GPU: the same greedy tokens as the PyTorch AQLM model
    assert greedy_tokens(cuda_artifact, "tvm") == greedy_tokens(ckpt, "torch")


def test_cuda_prefill_graph_matches_torch_on_cpu(built):
    """The CUDA Relax route's prefill (AQLM layers decoded by Relax ops, then matmul; no GPU kernel in it), compiled
    for the CPU so its numerics are checked on a machine without a GPU."""
    from tvm import relax

    from aqlm_compile.targets.plan import relax_graphs
    from aqlm_compile.targets.relax import relax_decoder_module
    from aqlm_compile.targets.x86 import x86_target

    ckpt, _ = built
    mod, params, spec, _ = relax_decoder_module(relax_graphs(ckpt), device="cuda")
    mod = tvm.IRModule({gv: f for gv, f in mod.functions_items() if not gv.name_hint.startswith("decode")})
    from tvm.s_tir import dlight as dl

    with x86_target():  # as compile_relax_model does for the CPU
        mod = dl.ApplyDefaultSchedule(dl.cpu.GEMV(), dl.cpu.Reduction())(relax.transform.LegalizeOps()(mod))
    vm = relax.VirtualMachine(tvm.compile(mod, target=x86_target()), tvm.cpu())
    ids = np.array([[1, 5, 9, 13, 17, 21]], np.int64)
    empty = tvm.runtime.tensor(np.zeros((1, spec.num_kv_heads, 0, spec.head_dim), np.float32))
    out = vm["prefill"](tvm.runtime.tensor(ids), tvm.runtime.tensor(np.ones_like(ids)),
                        *[empty] * (2 * spec.num_layers), *params)
    want = torch_prefill_logits(ckpt, ids)
    got = out[0].numpy()[0]
    assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max())


@pytest.mark.parametrize("cfg", ["1x16g8", "2x8g8", "1x8g8", "8x8g32"])
def test_arm64_kernels_every_config_under_qemu(cfg, tmp_path):
    """Each config's arm64 kernels (GEMV, LUT where chosen, GEMM) against the torch reference, run under qemu."""
    import shutil

    require_arm64_toolchain()
    from tvm.support import cc

    from aqlm_compile.config import AqlmConfig
    from aqlm_compile.nn import AqlmLinear
    from aqlm_compile.targets.arm64 import CROSS_GCC, arm64_target, run_kernel, runtime_dir
    from aqlm_compile.targets.common import kernel_module

    config = AqlmConfig.parse(cfg)
    out_f, in_f = 2048, 256  # out large enough for the LUT kernel to be chosen for 8x8g32
    gen = torch.Generator().manual_seed(0)
    layer = AqlmLinear.from_parts(
        torch.randint(0, config.codebook_size, (out_f, in_f // config.in_group_size, config.num_codebooks), generator=gen),
        (torch.randn(config.num_codebooks, config.codebook_size, 1, config.in_group_size, generator=gen) * 0.1).half().float(),
        torch.rand(out_f, generator=gen) + 0.5, config)
    mod, kernels = kernel_module(config, {"l": (out_f, in_f)}, "llvm", max_batch=2)
    shutil.copytree(runtime_dir(), tmp_path / "runtime")
    tvm.compile(mod, target=arm64_target()).export_library(str(tmp_path / "kernels_arm64.so"),
                                                          fcompile=cc.cross_compiler(shutil.which(CROSS_GCC)))
    cb = layer.codebooks.detach().reshape(config.num_codebooks, config.codebook_size, -1).half().numpy()
    for symbol, tokens in ((f"aqlm_gemv_{out_f}x{in_f}_b1", 1), (f"aqlm_gemm_{out_f}x{in_f}", 5)):
        x = torch.randn(tokens, in_f, generator=gen)
        with torch.no_grad():
            ref = layer(x).double()
        y = run_kernel(tmp_path, symbol, [x.numpy(), layer.codes.numpy(), cb, layer.scales.detach().reshape(-1).numpy(),
                                          np.zeros(out_f, np.float32)], (tokens, out_f))
        assert ((torch.from_numpy(y).double() - ref).abs().max() / ref.abs().max()).item() <= 1e-5, symbol
    if cfg == "8x8g32":
        assert kernels[f"aqlm_gemv_{out_f}x{in_f}_b1"]["kernel"] == "gemv_lut"


def test_arm64_tests_fail_without_their_toolchain_unless_setup_recorded_why(monkeypatch, tmp_path):
    """Issue 15: the arm64 tests used to skip whenever the toolchain was missing, and CI stayed green."""
    import conftest

    monkeypatch.setattr(conftest.shutil, "which", lambda name, *a, **k: None)
    monkeypatch.setattr(conftest, "ARM64_UNAVAILABLE", tmp_path / "aarch64-toolchain-unavailable")
    monkeypatch.delenv("AQLM_COMPILE_REQUIRE_ARM64", raising=False)
    with pytest.raises(pytest.fail.Exception, match="run scripts/setup.sh"):
        require_arm64_toolchain()
    (tmp_path / "aarch64-toolchain-unavailable").write_text("apt-get failed: no route to the Debian mirror\n")
    with pytest.raises(pytest.skip.Exception, match="no route to the Debian mirror"):
        require_arm64_toolchain()
    monkeypatch.setenv("AQLM_COMPILE_REQUIRE_ARM64", "1")  # CI (.ci/run)
    with pytest.raises(pytest.fail.Exception):
        require_arm64_toolchain()
