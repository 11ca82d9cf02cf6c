import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="session")
def tiny_corpus(tiny_root):
    from tiny_models import write_corpus

    return write_corpus(tiny_root / "corpus.txt")


@pytest.fixture(scope="session")
def tiny_llama(tiny_root):
    from tiny_models import make_model

    return make_model(tiny_root / "llama", "llama")


@pytest.fixture(scope="session")
def tiny_qwen2(tiny_root):
    from tiny_models import make_model

    return make_model(tiny_root / "qwen2", "qwen2")


@pytest.fixture(scope="session")
def tiny_mistral(tiny_root):
    from tiny_models import make_model

    return make_model(tiny_root / "mistral", "mistral")


def _quantized(root, model_dir, config="2x8g8"):
    from aqlm_compile.jobs import quantize_job

    out = root / f"{model_dir.name}-{config}"
    if not (out / "config.json").exists():
        quantize_job(str(model_dir), str(out), config=config, dataset=str(_corpus(root)), preset="tiny", device="cpu",
                     overrides={"kmeans_iters": 3, "max_rounds": 1})
    return out


def _corpus(root):
    from tiny_models import write_corpus

    path = root / "corpus.txt"
    return path if path.exists() else write_corpus(path)


@pytest.fixture(scope="session")
def tiny_llama_ckpt(tiny_root, tiny_llama):
    """A quantized (2x8g8) tiny Llama checkpoint, shared by the export, ONNX and ORT tests."""
    return _quantized(tiny_root, tiny_llama)


@pytest.fixture(scope="session")
def tiny_qwen2_ckpt(tiny_root, tiny_qwen2):
    """A quantized tiny Qwen2 (biases on q/k/v: exercises the op's optional bias)."""
    return _quantized(tiny_root, tiny_qwen2)


@pytest.fixture(scope="session")
def llama_art(tiny_llama_ckpt, tiny_llama, tmp_path_factory):
    """The tiny Llama checkpoint built for x86 with every route (ONNX + ORT op library, whole-model TVM) and, with
    --dense, the FP model it was quantized from (its config.json records it) as the dense baseline; read-only for
    the tests sharing it (copy it to tamper). `--prefill fp32`: the tests sharing it check that the routes compute
    what PyTorch does to 1e-4; the default int8 prompt GEMM (kernels/gemm_vnni.py) rounds its operands, and its
    tests are tests/kernels/test_gemm_vnni.py and the LUT model of tests/kernels/test_gemv_lut_vbmi.py."""
    from click.testing import CliRunner

    from aqlm_compile.cli import main

    out = tmp_path_factory.mktemp("art") / "llama"
    r = CliRunner().invoke(main, ["build", str(tiny_llama_ckpt), "--target", "x86", "-o", str(out), "--dense",
                                     "--prefill", "fp32"])
    assert r.exit_code == 0, r.output
    return out


ARM64_UNAVAILABLE = Path(__file__).resolve().parent.parent / ".venv" / "aarch64-toolchain-unavailable"


def require_arm64_toolchain():
    """The arm64 tests need Debian's aarch64 g++ and qemu-user, which scripts/setup.sh installs. Missing, they fail
    (CI, where .ci/run sets AQLM_COMPILE_REQUIRE_ARM64=1, always fails them); they skip only where setup.sh tried
    and recorded why this machine cannot install them."""
    if shutil.which("aarch64-linux-gnu-g++") and shutil.which("qemu-aarch64"):
        return
    if os.environ.get("AQLM_COMPILE_REQUIRE_ARM64") != "1" and ARM64_UNAVAILABLE.is_file():
        pytest.skip("aarch64 g++/qemu-user cannot be installed on this machine (scripts/setup.sh: "
                    f"{ARM64_UNAVAILABLE.read_text().strip()[:200]})")
    pytest.fail("aarch64-linux-gnu-g++ or qemu-aarch64 missing: run scripts/setup.sh (it installs Debian's "
                "gcc/g++-aarch64-linux-gnu and qemu-user, or records why it cannot)")
