"""CUDA target: kernels for sm_80, sm_86, sm_89 and sm_90 plus compute_90 PTX (for newer GPUs), built on a
machine with no GPU and no driver, and checked from the built file.

Two traps this module exists to avoid (docs/tvm-and-ort-notes.md N3–N5):
- TVM's CUDA runtime sidecar (libtvm_runtime_cuda.so) needs the driver's libcuda.so.1. Without it TVM swallows the
  error and `tvm.compile` returns a module holding CUDA *source* only: no compiler runs, `export_library` writes a
  "CUDA" library with no device code, and nothing complains. When no driver is present we load a stub
  libcuda.so.1 (the nine driver entry points the sidecar imports, each returning CUDA_ERROR_NO_DEVICE) built from
  C with the host gcc, then load the sidecar ourselves — and we refuse to write an artifact unless the exported
  library really embeds device code for every requested architecture.
- TVM's nvcc callback compiles for one architecture and no PTX. We install our own `tvm_callback_cuda_compile`
  for the duration of the build that asks nvcc for one fat binary with SASS per architecture + PTX.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

from aqlm_compile.cache import cache_root
from aqlm_compile.errors import ConfigError, FormatError

from .registry import BuildOptions, Target, Toolchain, register_target

ARCHS = ("sm_80", "sm_86", "sm_89", "sm_90")
PTX_ARCH = "compute_90"

# The driver API symbols libtvm_runtime_cuda.so imports (nm -D --undefined-only, TVM 0.27.0.post1).
_DRIVER_SYMBOLS = ("cuDeviceGetName", "cuFuncSetAttribute", "cuGetErrorName", "cuGetErrorString", "cuLaunchKernelEx",
                   "cuModuleGetFunction", "cuModuleLoadData", "cuModuleUnload", "cuTensorMapEncodeTiled")
_CUDA_ERROR_NO_DEVICE = 100


def find_nvcc() -> str:
    """nvcc from PATH, $CUDA_PATH/bin or /usr/local/cuda/bin; a clear error otherwise."""
    candidates = [shutil.which("nvcc")]
    for root in (os.environ.get("CUDA_PATH"), os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if root:
            candidates.append(str(Path(root) / "bin" / "nvcc"))
    for c in candidates:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return c
    raise ConfigError("--target cuda: nvcc not found (looked in PATH, $CUDA_PATH/bin, /usr/local/cuda/bin); "
                      "install the CUDA toolkit (e.g. pip wheels nvidia-cuda-nvcc + nvidia-cuda-runtime 13.0)")


def _stub_libcuda() -> Path:
    """Build (once, cached) a stub libcuda.so.1 whose entry points all return CUDA_ERROR_NO_DEVICE."""
    out = cache_root() / "cuda-stub" / "libcuda.so.1"
    if out.is_file():
        return out
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        raise ConfigError("--target cuda: no GPU driver here and no C compiler (gcc) to build the stub libcuda.so.1")
    out.parent.mkdir(parents=True, exist_ok=True)
    src = "\n".join(f"int {s}(void) {{ return {_CUDA_ERROR_NO_DEVICE}; }}" for s in _DRIVER_SYMBOLS) + "\n"
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        (Path(tmp) / "stub.c").write_text(src)
        subprocess.run([gcc, "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", str(Path(tmp) / "libcuda.so.1"),
                        str(Path(tmp) / "stub.c")], check=True, capture_output=True)
        os.replace(Path(tmp) / "libcuda.so.1", out)
    return out


def ensure_cuda_codegen() -> str:
    """Make TVM able to emit real CUDA modules; returns "driver" or "stub" (which libcuda.so.1 is in use)."""
    from tvm.base import _LOADED_LIBS

    if "tvm_runtime_cuda" in _LOADED_LIBS:
        return "driver"
    ctypes.CDLL(str(_stub_libcuda()), mode=ctypes.RTLD_GLOBAL)  # satisfies the sidecar's NEEDED libcuda.so.1
    from tvm_ffi.libinfo import load_lib_ctypes

    runtime_dir = Path(_LOADED_LIBS["tvm_runtime"]._name).resolve().parent
    try:
        _LOADED_LIBS["tvm_runtime_cuda"] = load_lib_ctypes(package="tvm", target_name="tvm_runtime_cuda",
                                                           extra_lib_paths=[runtime_dir], mode="RTLD_LOCAL")
    except (OSError, FileNotFoundError, RuntimeError) as exc:
        raise ConfigError(f"--target cuda: cannot load TVM's CUDA runtime (libtvm_runtime_cuda.so): {exc}") from None
    return "stub"


def cuda_target(arch: str = "sm_90"):
    from .common import tvm

    return tvm.target.Target({"kind": "cuda", "arch": arch}, host={"kind": "llvm", "mtriple": "x86_64-linux-gnu"})


def nvcc_fatbin(code: str, archs=ARCHS, ptx_arch: str | None = PTX_ARCH) -> bytes:
    """Compile CUDA source into one fat binary: SASS for each arch, plus PTX for `ptx_arch` (JIT on newer GPUs)."""
    nvcc = find_nvcc()
    flags = []
    for a in archs:
        flags += ["-gencode", f"arch=compute_{a[3:]},code={a}"]
    if ptx_arch:
        flags += ["-gencode", f"arch={ptx_arch},code={ptx_arch}"]
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "kernels.cu", Path(tmp) / "kernels.fatbin"
        src.write_text(code)
        # No fatbin compression, so the cubins can be checked from the artifact without NVIDIA tools.
        cmd = [nvcc, "--fatbin", "-O3", "-Xfatbin=-compress-all=false", *flags, "-o", str(out), str(src)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            cmd = [c for c in cmd if not c.startswith("-Xfatbin")]
            proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise ConfigError(f"nvcc failed ({' '.join(cmd)}): {proc.stderr.strip()[-2000:]}")
        return out.read_bytes()


@contextlib.contextmanager
def _multi_arch_compiler(archs, ptx_arch):
    import tvm_ffi

    old = tvm_ffi.get_global_func("tvm_callback_cuda_compile", allow_missing=True)
    tvm_ffi.register_global_func("tvm_callback_cuda_compile", lambda code, *_: nvcc_fatbin(code, archs, ptx_arch),
                                 override=True)
    try:
        yield
    finally:
        if old is not None:
            tvm_ffi.register_global_func("tvm_callback_cuda_compile", old, override=True)


# --- checking the built file -------------------------------------------------------------------------------------
_FATBIN_MAGIC = 0xBA55ED50
_EM_CUDA = 190


def _elf_sm(elf: bytes) -> int | None:
    """The SM version of a CUDA ELF (cubin) from its header, or None if `elf` is not one."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2:  # 64-bit
        return None
    e_machine = struct.unpack_from("<H", elf, 18)[0]
    if e_machine != _EM_CUDA:
        return None
    e_flags = struct.unpack_from("<I", elf, 48)[0]
    # e_flags: sm in bits 8..15 for CUDA ≥ 12.x ELF ABI v8 (EF_CUDA_SM), else bits 0..7
    sm = (e_flags >> 8) & 0xFF
    return sm if sm >= 20 else e_flags & 0xFF


def device_code_inventory(path) -> list[dict]:
    """Every device-code entry of every fat binary embedded in a file: kind (sass/ptx), sm, and for SASS the SM read
    again from the cubin's own ELF header (when stored uncompressed)."""
    data = Path(path).read_bytes()
    entries, pos = [], 0
    magic = struct.pack("<I", _FATBIN_MAGIC)
    while (pos := data.find(magic, pos)) >= 0:
        try:
            _, _, header_size, fat_size = struct.unpack_from("<IHHQ", data, pos)
        except struct.error:
            break
        off, end = pos + header_size, pos + header_size + fat_size
        if header_size != 16 or end > len(data):
            pos += 4
            continue
        while off + 64 <= end:
            kind, _ver, ehdr, payload = struct.unpack_from("<HHIQ", data, off)
            sm = struct.unpack_from("<I", data, off + 28)[0]
            flags = struct.unpack_from("<Q", data, off + 40)[0]
            if ehdr < 64 or payload == 0 or kind not in (1, 2):
                break
            body = data[off + ehdr: off + ehdr + payload]
            compressed = bool(flags & 0x2000)
            rec = {"kind": "ptx" if kind == 1 else "sass", "sm": sm, "compressed": compressed}
            if kind == 2 and not compressed:
                rec["elf_sm"] = _elf_sm(body)
            entries.append(rec)
            off += ehdr + payload
        pos = end
    return entries


def check_device_code(path, archs=ARCHS, ptx_arch: str | None = PTX_ARCH) -> list[dict]:
    """Raise unless `path` embeds SASS for every arch (ELF header agreeing where readable) and the PTX."""
    inv = device_code_inventory(path)
    if not inv:
        raise FormatError(f"{path}: no CUDA device code embedded (a source-only CUDA module?)")
    sass = {e["sm"] for e in inv if e["kind"] == "sass"}
    for a in archs:
        if int(a[3:]) not in sass:
            raise FormatError(f"{path}: no SASS for {a} (found sm {sorted(sass)})")
    for e in inv:
        if e["kind"] == "sass" and e.get("elf_sm") not in (None, e["sm"]):
            raise FormatError(f"{path}: fatbin entry says sm_{e['sm']} but its cubin header says sm_{e['elf_sm']}")
    if ptx_arch and int(ptx_arch.split("_")[1]) not in {e["sm"] for e in inv if e["kind"] == "ptx"}:
        raise FormatError(f"{path}: no PTX for {ptx_arch}")
    return inv


def _archs(options: BuildOptions) -> tuple[str, ...]:
    return tuple(options.archs) if options.archs else ARCHS


def _check(options: BuildOptions) -> None:
    for a in _archs(options):
        if not (a.startswith("sm_") and a[3:].isdigit()):
            raise ConfigError(f"--arch {a!r}: expected sm_XY (e.g. sm_80, sm_90)")
    find_nvcc()


def _toolchain(options: BuildOptions) -> Toolchain:
    return Toolchain(manifest={"built_with_driver": ensure_cuda_codegen()})


# The GEMV kernels every quantized layer needs in `kernels_cuda.so` (host x86_64 + fat binary); the whole model for
# the Relax VM (`model_cuda.so` + params): decode on the GEMV kernels, prefill as a Relax decode + matmul, the rest
# scheduled by dlight. Every library is checked for device code of each arch before the artifact is written.
CUDA = register_target(Target(
    name="cuda", kind="cuda", summary="NVIDIA GPUs (--arch, default sm_80,sm_86,sm_89,sm_90 + compute_90 PTX)",
    tvm_target=lambda options: cuda_target(max(_archs(options), key=lambda a: int(a[3:]))),
    arch=lambda options: "+".join(_archs(options)),
    target_spec=lambda t, options: {"kind": "cuda", "archs": list(_archs(options)), "ptx": options.ptx_arch,
                                    "host": "x86_64-linux-gnu"},
    routes=("tvm",), options=("archs",), toolchain=_toolchain, check=_check,
    check_library=lambda path, options: check_device_code(path, _archs(options), options.ptx_arch),
    compile_context=lambda options: _multi_arch_compiler(_archs(options), options.ptx_arch),
))
