"""arm64 (aarch64 Linux, NEON) target: LLVM cross-compilation linked with Debian's gcc-aarch64-linux-gnu.

The artifact also carries an aarch64 runtime: `runtime/libtvm_runtime.so` and `runtime/libtvm_ffi.so` (taken from
the aarch64 PyPI wheels of apache-tvm / apache-tvm-ffi, same versions as the compiler), `runtime/aqlm_run`, a
small C++ program (targets/runner/aqlm_run.cc) that loads the kernel library and calls a kernel on tensors from a
file, and `runtime/aqlm_vm_run` (targets/runner/aqlm_vm_run.cc), which runs the whole-model Relax VM library as a
logits server for `generate --runtime tvm`. On an x86 build machine both execute under Debian's qemu-user, which is
how correctness is checked.
"""

from __future__ import annotations

import hashlib
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from aqlm_compile.cache import atomic_dir, cache_root
from aqlm_compile.errors import ConfigError

from .registry import BuildOptions, Target, Toolchain, register_target

CROSS_GCC = "aarch64-linux-gnu-gcc"
CROSS_GXX = "aarch64-linux-gnu-g++"
QEMU = "qemu-aarch64"
SYSROOT = "/usr/aarch64-linux-gnu"
WHEELS = ("apache-tvm==0.27.0.post1", "apache-tvm-ffi==0.1.15.post2")
RUNTIME_MEMBERS = {"tvm/lib/libtvm_runtime.so": "libtvm_runtime.so", "tvm_ffi/lib/libtvm_ffi.so": "libtvm_ffi.so"}
RUNNER_SOURCES = {"aqlm_run": Path(__file__).parent / "runner" / "aqlm_run.cc",
                  "aqlm_vm_run": Path(__file__).parent / "runner" / "aqlm_vm_run.cc"}


DEFAULT_CPU = "neoverse-n1"


def arm64_target(cpu: str = DEFAULT_CPU):
    from .common import tvm

    return tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": cpu, "mattr": ["+neon"]})


def require_tool(tool: str, package: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise ConfigError(f"{tool} not found: the arm64 target needs Debian's {package} "
                          f"(scripts/setup.sh installs it; or apt-get install {package})")
    return path


def runtime_dir() -> Path:
    """aarch64 TVM runtime libraries and the runner, fetched/built once into the cache."""
    key = hashlib.sha256(b"".join(p.read_bytes() for p in RUNNER_SOURCES.values())).hexdigest()[:12]
    out = cache_root() / f"arm64-runtime-0.27.0.post1-{key}"  # a changed runner source builds a new one
    if all((out / name).exists() for name in RUNNER_SOURCES):
        return out
    gxx = require_tool(CROSS_GXX, "g++-aarch64-linux-gnu")
    import tvm_ffi

    include = Path(tvm_ffi.__file__).parent / "include"
    with tempfile.TemporaryDirectory() as tmp, atomic_dir(out, keep_existing=True) as dest:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
               "--platform", "manylinux_2_28_aarch64", "--python-version", "3.11", "-d", tmp, *WHEELS]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise ConfigError(f"could not download the aarch64 TVM runtime wheels: {proc.stderr.strip()[-300:]}")
        for wheel in Path(tmp).glob("*.whl"):
            with zipfile.ZipFile(wheel) as zf:
                for member, name in RUNTIME_MEMBERS.items():
                    if member in zf.namelist():
                        (dest / name).write_bytes(zf.read(member))
        missing = [n for n in RUNTIME_MEMBERS.values() if not (dest / n).exists()]
        if missing:
            raise ConfigError(f"aarch64 wheels lack {missing}")
        for name, source in RUNNER_SOURCES.items():
            proc = subprocess.run([gxx, "-std=c++17", "-O2", f"-I{include}", str(source), "-o", str(dest / name),
                                   f"-L{dest}", "-ltvm_ffi", "-ltvm_runtime", "-Wl,-rpath,$ORIGIN"],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                raise ConfigError(f"building the aarch64 {name} failed: {proc.stderr.strip()[-500:]}")
    return out


def _toolchain(options: BuildOptions) -> Toolchain:
    """Debian's aarch64 gcc for the libraries, g++ for the ORT op library, and the aarch64 TVM runtime + runners
    (runtime_dir) shipped in the artifact."""
    from tvm.support import cc

    gcc = require_tool(CROSS_GCC, "gcc-aarch64-linux-gnu")
    rt = runtime_dir()
    libs = {name: rt / name for name in ("libtvm_runtime.so", "libtvm_ffi.so")}
    return Toolchain(fcompile=cc.cross_compiler(gcc),
                     cxx=require_tool(CROSS_GXX, "g++-aarch64-linux-gnu") if options.onnx else "g++",
                     runtime_libs=libs,
                     files={f"runtime/{name}": rt / name for name in (*libs, *RUNNER_SOURCES)},
                     manifest={"runner": "runtime/aqlm_run LIB FUNCTION IN_FILE OUT_FILE"})


ARM64 = register_target(Target(
    name="arm64", kind="llvm", summary=f"aarch64 Linux, NEON (--cpu, default {DEFAULT_CPU}); cross-built, run "
    "here under qemu-user",
    tvm_target=lambda options: arm64_target(options.cpu or DEFAULT_CPU),
    arch=lambda options: "aarch64",
    target_spec=lambda t, options: {"kind": "llvm", "mtriple": "aarch64-linux-gnu",
                                    "mcpu": options.cpu or DEFAULT_CPU, "mattr": ["+neon"]},
    options=("cpu",), toolchain=_toolchain, check=lambda options: require_tool(CROSS_GCC, "gcc-aarch64-linux-gnu"),
    runner="runtime/aqlm_vm_run",
))


_DTYPES = {np.dtype("float32"): (2, 32), np.dtype("float16"): (2, 16), np.dtype("int8"): (0, 8),
           np.dtype("int16"): (0, 16)}


def run_kernel(artifact_dir, symbol: str, inputs: list[np.ndarray], out_shape, out_dtype="float32",
               emulate: bool = True) -> np.ndarray:
    """Call one kernel of an arm64 artifact through its runner (under qemu-user when `emulate`)."""
    artifact_dir = Path(artifact_dir)
    out = np.zeros(out_shape, dtype=out_dtype)
    with tempfile.TemporaryDirectory() as tmp:
        in_file, out_file = Path(tmp) / "in.bin", Path(tmp) / "out.bin"
        with open(in_file, "wb") as fh:
            arrays = [np.ascontiguousarray(a) for a in inputs] + [out]
            fh.write(struct.pack("<i", len(arrays)))
            for a in arrays:
                code, bits = _DTYPES[a.dtype]
                fh.write(struct.pack("<iii", code, bits, a.ndim) + struct.pack(f"<{a.ndim}q", *a.shape))
                if a is not out:
                    fh.write(a.tobytes())
        runtime = artifact_dir / "runtime"
        cmd = [str(runtime / "aqlm_run"), str(artifact_dir / "kernels_arm64.so"), symbol, str(in_file), str(out_file)]
        if emulate:
            cmd = [require_tool(QEMU, "qemu-user"), "-L", SYSROOT, "-E", f"LD_LIBRARY_PATH={runtime}"] + cmd
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"aqlm_run failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
        return np.fromfile(out_file, dtype=out_dtype).reshape(out_shape)


ORT_RUNNER_SOURCE = Path(__file__).parent / "runner" / "aqlm_ort_run.cc"


def ort_runner_dir() -> Path:
    """An aarch64 `aqlm_ort_run` (targets/runner/aqlm_ort_run.cc) linked against libonnxruntime from the aarch64
    wheel of the installed onnxruntime version: checks the arm64 ORT op library under qemu-user. A test tool, not
    part of the artifact (a deployment brings its own ONNX Runtime)."""
    from importlib.metadata import version

    ort_version = version("onnxruntime")
    key = hashlib.sha256(ORT_RUNNER_SOURCE.read_bytes() + (ORT_RUNNER_SOURCE.parent.parent / "ort_op" / "ort_min_abi.h")
                         .read_bytes()).hexdigest()[:12]
    out = cache_root() / f"arm64-ort-{ort_version}-{key}"
    if (out / "aqlm_ort_run").exists():
        return out
    gxx = require_tool(CROSS_GXX, "g++-aarch64-linux-gnu")
    with tempfile.TemporaryDirectory() as tmp, atomic_dir(out, keep_existing=True) as dest:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
               "--platform", "manylinux_2_28_aarch64", "--python-version", "3.11", "-d", tmp,
               f"onnxruntime=={ort_version}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise ConfigError(f"could not download the aarch64 onnxruntime wheel: {proc.stderr.strip()[-300:]}")
        member = f"onnxruntime/capi/libonnxruntime.so.{ort_version}"
        for wheel in Path(tmp).glob("*.whl"):
            with zipfile.ZipFile(wheel) as zf:
                if member in zf.namelist():
                    (dest / "libonnxruntime.so.1").write_bytes(zf.read(member))  # its SONAME
        if not (dest / "libonnxruntime.so.1").exists():
            raise ConfigError(f"the aarch64 onnxruntime wheel lacks {member}")
        proc = subprocess.run([gxx, "-std=c++17", "-O2", str(ORT_RUNNER_SOURCE), "-o", str(dest / "aqlm_ort_run"),
                               f"-L{dest}", "-l:libonnxruntime.so.1", "-Wl,-rpath,$ORIGIN"],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise ConfigError(f"building the aarch64 aqlm_ort_run failed: {proc.stderr.strip()[-500:]}")
    return out


_FAKE_CPUINFO = """processor\t: 0
BogoMIPS\t: 50.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x3
CPU part\t: 0xd0c
CPU revision\t: 1

"""


def qemu_prefix() -> Path:
    """A qemu-user `-L` prefix: the Debian aarch64 sysroot (symlinked) plus an aarch64 /proc/cpuinfo and
    /sys/devices/system/cpu/{possible,present,online} describing one Neoverse-N1 core. qemu-user 7.2 shows the guest
    the host's x86 /proc/cpuinfo; ONNX Runtime's cpuinfo library then finds no ARM processor and dereferences NULL
    before main(). qemu looks a guest's absolute paths up under the prefix first, so these files take their place."""
    out = cache_root() / "qemu-aarch64-prefix-1"
    if (out / "proc" / "cpuinfo").exists():
        return out
    with atomic_dir(out, keep_existing=True) as dest:
        for entry in Path(SYSROOT).iterdir():
            (dest / entry.name).symlink_to(entry)
        (dest / "proc").mkdir()
        (dest / "proc" / "cpuinfo").write_text(_FAKE_CPUINFO)
        cpu = dest / "sys" / "devices" / "system" / "cpu"
        cpu.mkdir(parents=True)
        for name in ("possible", "present", "online"):
            (cpu / name).write_text("0\n")
    return out


def run_ort_model(artifact_dir, model_path, x: np.ndarray, input_name: str = "x", output_name: str = "y",
                  emulate: bool = True) -> np.ndarray:
    """Run a one-input ONNX model with the arm64 artifact's ORT op library registered, through ONNX Runtime's C API
    (aarch64, under qemu-user when `emulate`); returns the first output."""
    artifact_dir = Path(artifact_dir)
    rt = ort_runner_dir()
    x = np.ascontiguousarray(x, dtype=np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        in_file, out_file = Path(tmp) / "in.bin", Path(tmp) / "out.bin"
        in_file.write_bytes(struct.pack("<i", x.ndim) + struct.pack(f"<{x.ndim}q", *x.shape) + x.tobytes())
        cmd = [str(rt / "aqlm_ort_run"), str(model_path), str(artifact_dir / "libaqlm_ort.so"), input_name,
               output_name, str(in_file), str(out_file)]
        if emulate:
            cmd = [require_tool(QEMU, "qemu-user"), "-L", str(qemu_prefix()), "-E", "AQLM_NUM_THREADS=1"] + cmd
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"aqlm_ort_run failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
        raw = out_file.read_bytes()
    (ndim,) = struct.unpack("<i", raw[:4])
    shape = struct.unpack(f"<{ndim}q", raw[4:4 + 8 * ndim])
    return np.frombuffer(raw[4 + 8 * ndim:], dtype=np.float32).reshape(shape).copy()
