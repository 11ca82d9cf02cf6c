"""The ONNX Runtime custom-op library of an artifact: `libaqlm_ort.so` built from `ort_op/aqlm_ort_op.cc` with the
host g++ (x86) or Debian's aarch64-linux-gnu-g++ (arm64), linked against the TVM runtime libraries that the
artifact carries in `runtime/` (rpath `$ORIGIN/runtime`), so a user needs onnxruntime and nothing else."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from aqlm_compile.errors import ConfigError

SOURCE_DIR = Path(__file__).parent / "ort_op"
LIBRARY = "libaqlm_ort.so"


def host_runtime_libs() -> dict[str, Path]:
    """This machine's libtvm_runtime.so and libtvm_ffi.so (from the installed wheels)."""
    import tvm
    import tvm_ffi

    libs = {"libtvm_runtime.so": Path(tvm.__file__).parent / "lib" / "libtvm_runtime.so",
            "libtvm_ffi.so": Path(tvm_ffi.__file__).parent / "lib" / "libtvm_ffi.so"}
    for name, path in libs.items():
        if not path.is_file():
            raise ConfigError(f"{path}: missing ({name} of the installed TVM wheels)")
    return libs


def build_ort_library(dest: Path, kernel_library: str, runtime_libs: dict[str, Path], cxx: str = "g++",
                      march_flags=()) -> list[str]:
    """Compile the op library into `dest/libaqlm_ort.so` and copy the runtime libraries into `dest/runtime/`.
    Returns the files written (relative to dest)."""
    import tvm_ffi

    compiler = shutil.which(cxx)
    if compiler is None:
        raise ConfigError(f"{cxx} not found: the ONNX Runtime op library needs a C++ compiler "
                          "(scripts/setup.sh installs Debian's g++ and the aarch64 cross g++)")
    rt = dest / "runtime"
    rt.mkdir(parents=True, exist_ok=True)
    for name, path in runtime_libs.items():
        shutil.copy2(path, rt / name)
    include = Path(tvm_ffi.__file__).parent / "include"
    cmd = [compiler, "-std=c++17", "-O2", "-shared", "-fPIC", "-fvisibility=hidden", *march_flags,
           f"-I{include}", f"-I{SOURCE_DIR}", f'-DAQLM_KERNEL_LIBRARY="{kernel_library}"',
           str(SOURCE_DIR / "aqlm_ort_op.cc"), "-o", str(dest / LIBRARY),
           f"-L{rt}", "-ltvm_ffi", "-ltvm_runtime", "-Wl,-rpath,$ORIGIN/runtime", "-Wl,--no-undefined"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ConfigError(f"building {LIBRARY} failed: {proc.stderr.strip()[-1500:]}")
    return [LIBRARY] + [f"runtime/{n}" for n in runtime_libs]
