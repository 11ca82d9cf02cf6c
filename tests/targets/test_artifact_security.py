"""What a runtime opens from an artifact folder (issue 15, docs/security.md): only files the manifest names, inside
the folder, never through a symlink, each among the sha256-checked files; code compiled for CPU features this
machine has; a GPU artifact only on a GPU it was built for. Every refusal is a one-line FormatError."""

import json
import shutil

import pytest
from click.testing import CliRunner

from aqlm_compile import artifact
from aqlm_compile.cli import main
from aqlm_compile.errors import FormatError


def copy_of(art, tmp_path, name="art"):
    dst = tmp_path / name
    shutil.copytree(art, dst)
    return dst


def edit_manifest(art, fn):
    path = art / artifact.MANIFEST
    manifest = json.loads(path.read_text())
    fn(manifest)
    path.write_text(json.dumps(manifest))


def open_tvm(art):
    from aqlm_compile.runtime.tvm_runtime import TvmDecoder

    return TvmDecoder(art, threads=1)


def open_ort(art):
    from aqlm_compile.runtime.ort import OrtDecoder

    return OrtDecoder(art, threads=1)


def open_kernels(art):
    from aqlm_compile.runtime.kernels import KernelLibrary

    return KernelLibrary(art)


def set_field(manifest, dotted, value):
    *parents, last = dotted.split(".")
    node = manifest
    for key in parents:
        node = node[key]
    node[last] = value


# (manifest field, the runtime that opens it, the file it names in a built artifact)
OPENED = [("tvm.library", open_tvm, "model_x86.so"), ("tvm.params", open_tvm, "model_params.bin"),
          ("onnx.op_library", open_ort, "libaqlm_ort.so"), ("onnx.model", open_ort, "onnx/model.onnx"),
          ("kernel_library", open_kernels, "kernels_x86.so")]


@pytest.mark.parametrize("field,opener,name", OPENED, ids=[f for f, _, _ in OPENED])
@pytest.mark.parametrize("escape", ["absolute", "dotdot", "unlisted"])
def test_manifest_paths_stay_inside_the_folder_and_among_the_hashed_files(field, opener, name, escape, llama_art,
                                                                          tmp_path):
    """A manifest naming a file outside the folder (absolute, `../`) or one no sha256 covers is refused before
    anything is loaded; the named file is a working copy of the real one, so only the check stops it."""
    art = copy_of(llama_art, tmp_path)
    outside = tmp_path / ("evil-" + name.replace("/", "-"))
    shutil.copyfile(llama_art / name, outside)
    if escape == "unlisted":
        shutil.copyfile(llama_art / name, art / "extra.bin")
    value = {"absolute": str(outside), "dotdot": f"../{outside.name}", "unlisted": "extra.bin"}[escape]
    edit_manifest(art, lambda m: set_field(m, field, value))
    expected = "not among the files whose sha256" if escape == "unlisted" else "points outside the artifact folder"
    with pytest.raises(FormatError, match=expected):
        opener(art)


@pytest.mark.parametrize("link", ["file", "folder"])
def test_symlinks_are_refused(link, llama_art, tmp_path):
    """A link with the right contents (so the sha256 matches) is still refused: it could point anywhere."""
    art = copy_of(llama_art, tmp_path)
    if link == "file":
        outside = tmp_path / "params.bin"
        shutil.move(art / "model_params.bin", outside)
        (art / "model_params.bin").symlink_to(outside)
        opener, where = open_tvm, "model_params.bin: a symbolic link"
    else:
        shutil.move(art / "onnx", tmp_path / "onnx-outside")
        (art / "onnx").symlink_to(tmp_path / "onnx-outside")
        opener, where = open_ort, "onnx: a symbolic link"
    with pytest.raises(FormatError, match=where):
        opener(art)


def test_files_entries_are_checked(llama_art, tmp_path):
    art = copy_of(llama_art, tmp_path)
    edit_manifest(art, lambda m: m["files"].update({"../../etc/passwd": m["files"]["model_params.bin"]}))
    with pytest.raises(FormatError, match=r"files: '../../etc/passwd' points outside"):
        artifact.verify(art)
    art = copy_of(llama_art, tmp_path, "art2")
    edit_manifest(art, lambda m: m["files"]["model_params.bin"].update(sha256="zz"))
    with pytest.raises(FormatError, match=r"files.model_params.bin: expected \{\"sha256\": 64 hex digits"):
        artifact.verify(art)
    art = copy_of(llama_art, tmp_path, "art3")
    with open(art / "model_params.bin", "ab") as f:
        f.write(b"\0")
    with pytest.raises(FormatError, match="model_params.bin: .* bytes, manifest.json says"):
        artifact.verify(art)


@pytest.mark.parametrize("field,value,message", [
    ("tvm.decoder.num_layers", "2", r"tvm.decoder: num_layers: expected an integer in 1..4096, found '2'"),
    ("tvm.decoder.vocab_size", 10 ** 12, r"vocab_size: expected an integer in 1..2147483648"),
    ("tvm.decoder.eos_token_ids", [5, -1], r"eos_token_ids\[1\]: expected an integer in 0..258, found -1"),
    ("tvm.num_params", None, r"tvm.num_params: expected an integer"),
    ("tvm", [], r"tvm: expected an object"),
    ("format_version", 99, r"format_version: 99"),
    ("files", "x", r"files: expected an object"),
])
def test_manifest_values_are_typed_before_use(field, value, message, llama_art, tmp_path):
    art = copy_of(llama_art, tmp_path)
    edit_manifest(art, lambda m: set_field(m, field, value))
    with pytest.raises(FormatError, match=message):
        open_tvm(art)
    r = CliRunner().invoke(main, ["generate", str(art), "hi", "--runtime", "tvm", "--max-new-tokens", "2"])
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert r.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: FormatError"), r.output


def test_the_build_records_the_cpu_features_its_code_uses(llama_art):
    from aqlm_compile.targets.common import cpu_features
    from aqlm_compile.targets.x86 import x86_target

    recorded = json.loads((llama_art / artifact.MANIFEST).read_text())["cpu_features"]
    host = artifact.host_cpu_flags()
    assert recorded and all(artifact.CPUINFO_FLAG["x86_64"][f] in host for f in recorded), recorded
    assert {"avx512f", "avx512bw"} <= set(cpu_features(x86_target("avx512"), "x86_64"))
    assert "avx512vbmi" in cpu_features(x86_target("znver4"), "x86_64")


@pytest.mark.parametrize("opener", [open_tvm, open_ort, open_kernels], ids=["tvm", "ort", "kernels"])
def test_code_for_a_cpu_feature_this_machine_lacks_is_refused(opener, llama_art, tmp_path):
    """Today's SIGILL on an older CPU: the runtime names the missing feature instead of loading the code."""
    host = artifact.host_cpu_flags()
    missing = next((f for f, flag in artifact.CPUINFO_FLAG["x86_64"].items() if flag not in host), None)
    if missing is None:
        pytest.skip("this CPU has every x86 feature aqlm-compile checks for: none to take away")
    art = copy_of(llama_art, tmp_path)
    edit_manifest(art, lambda m: m["cpu_features"].append(missing))
    with pytest.raises(FormatError, match=f"cpu_features: built for .*uses {missing}; this CPU lacks it"):
        opener(art)
    # the same check with a CPU that has the feature passes
    manifest = artifact.read_manifest(art)
    artifact.check_cpu_features(manifest, art, host | {artifact.CPUINFO_FLAG["x86_64"][missing]})


def test_gpu_arch_is_checked():
    from aqlm_compile.runtime.tvm_runtime import check_gpu_arch

    manifest = {"target_spec": {"archs": ["sm_80", "sm_89"], "ptx": "compute_90"}}
    for ok in ("8.0", "8.6", "8.9", "9.0", "10.0", "12.0"):
        check_gpu_arch(manifest, artifact.Path("/a"), ok)
    for bad in ("7.5", "7.0"):
        with pytest.raises(FormatError, match=f"this GPU is sm_{bad.replace('.', '')}"):
            check_gpu_arch(manifest, artifact.Path("/a"), bad)
    with pytest.raises(FormatError, match="sm_90"):
        check_gpu_arch({"target_spec": {"archs": ["sm_80"], "ptx": None}}, artifact.Path("/a"), "9.0")


def test_explicit_threads_win_over_the_environment(llama_art):
    """`threads=` (the CLI's --threads) sets the TVM pool even when TVM_NUM_THREADS says otherwise (it used to be
    ignored: the runtimes only set the variable when it was absent)."""
    import os
    import subprocess
    import sys

    code = ("import sys, numpy as np, tvm_ffi\n"
            "from aqlm_compile.runtime.tvm_runtime import TvmDecoder\n"
            "d = TvmDecoder(sys.argv[1], threads=1)\n"
            "d.step(np.array([1, 2, 3]))\n"
            "print(tvm_ffi.get_global_func('runtime.NumThreads')())\n")
    env = {**os.environ, "TVM_NUM_THREADS": "2"}
    out = subprocess.run([sys.executable, "-c", code, str(llama_art)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "1", out.stdout


@pytest.mark.parametrize("existing", [False, True], ids=["fresh", "over-an-artifact"])
def test_a_killed_build_leaves_no_half_artifact(existing, tiny_llama_ckpt, llama_art, tmp_path):
    """kill -9 in the middle of `build`: the final name holds nothing (a fresh build) or the previous, complete
    artifact (a rebuild), never a half-written one."""
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    out = tmp_path / "art"
    if existing:
        shutil.copytree(llama_art, out)
    cli = Path(sys.executable).parent / "aqlm-compile"
    proc = subprocess.Popen([str(cli), "build", str(tiny_llama_ckpt), "--target", "x86", "-o", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(12 if existing else 8)  # inside the export/compile, before the rename
    assert proc.poll() is None, "the build ended before the kill: the test needs a longer build"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if existing:
        assert artifact.verify(out)["files"] == artifact.read_manifest(llama_art)["files"]
    else:
        assert not out.exists()
