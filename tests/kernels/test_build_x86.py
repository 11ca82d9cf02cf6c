"""`aqlm-compile build --target x86`: an artifact folder whose kernels reproduce the checkpoint's layers."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

pytest.importorskip("tvm")

from aqlm_compile import format as fmt  # noqa: E402
from aqlm_compile.cli import main  # noqa: E402
from aqlm_compile.errors import ConfigError, FormatError  # noqa: E402
from aqlm_compile.runtime.kernels import KernelLibrary  # noqa: E402


@pytest.fixture(scope="module")
def built(tiny_llama, tiny_corpus, tmp_path_factory):
    from aqlm_compile.jobs import quantize_job

    root = tmp_path_factory.mktemp("build")
    ckpt = root / "ckpt"
    quantize_job(str(tiny_llama), str(ckpt), config="2x8g8", dataset=str(tiny_corpus), preset="tiny", device="cpu",
                 overrides={"kmeans_iters": 3, "max_rounds": 1})
    r = CliRunner().invoke(main, ["build", str(ckpt), "--target", "x86", "-o", str(root / "art")])
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
    for layer in ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]:
        for batch in (1, 5):
            x = torch.randn(batch, modules[layer].in_features, generator=torch.Generator().manual_seed(batch))
            with torch.no_grad():
                ref = modules[layer](x.double().float()).double()
            y = torch.from_numpy(lib.linear(layer, x.numpy())).double()
            assert ((y - ref).abs().max() / ref.abs().max()).item() <= 1e-5


def test_artifact_bad_inputs(built):
    _, art = built
    lib = KernelLibrary(art)
    with pytest.raises(ConfigError, match=r"expected float32 \[N, 64\], found float64"):
        lib.linear("model.layers.0.self_attn.q_proj", np.zeros((1, 64)))
    with pytest.raises(ConfigError, match="no kernel for batch 9"):
        lib.linear("model.layers.0.self_attn.q_proj", np.zeros((9, 64), np.float32))
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
    with open(copy / "kernels_x86.so", "r+b") as f:
        f.seek(100)
        f.write(b"\0\1\2\3")
    with pytest.raises(FormatError, match="kernels_x86.so: sha256 does not match"):
        KernelLibrary(copy)


def test_unsupported_target_is_clear(built):
    ckpt, _ = built
    r = CliRunner().invoke(main, ["build", str(ckpt), "--target", "cuda"])
    assert r.exit_code == 2 and "--target cuda: not built yet" in r.output
    r = CliRunner().invoke(main, ["build", str(ckpt), "--target", "riscv"])
    assert r.exit_code == 2


def test_arm64_artifact_runs_under_qemu(built, tmp_path):
    """Cross-compiled with gcc-aarch64-linux-gnu, run by the artifact's own aarch64 runner under qemu-user."""
    import shutil

    if not (shutil.which("aarch64-linux-gnu-g++") and shutil.which("qemu-aarch64")):
        pytest.skip("needs Debian's gcc/g++-aarch64-linux-gnu and qemu-user (scripts/setup.sh installs them)")
    from aqlm_compile.targets.arm64 import run_kernel

    ckpt, _ = built
    art = tmp_path / "arm"
    r = CliRunner().invoke(main, ["build", str(ckpt), "--target", "arm64", "-o", str(art)])
    assert r.exit_code == 0, r.output
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["arch"] == "aarch64" and "runtime/aqlm_run" in manifest["files"]
    assert open(art / "kernels_arm64.so", "rb").read(20)[18] == 183  # ELF e_machine EM_AARCH64
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
