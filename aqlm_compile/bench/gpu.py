"""GPU benchmark (`python -m aqlm_compile.bench.gpu --out DIR [--quick] [--dry-run]`; `bash benchmarks/gpu.sh`).

Four sections, each recorded on its own (a failure is one line in its record; the others still run):
- `numerics`: every config's CUDA GEMV (batch 1 and the largest GEMV batch, a small shape) on the GPU against the
  torch reference decode (`aqlm_compile.nn.decode_weight`, float64), with the repo's kernel tolerance;
- `kernels`: the GEMV at Llama shapes against cuBLAS FP16 (`torch.mm` of fp16 on the GPU), both timed by CUDA
  graph replay with CUDA events, with the weights L2-cold (rotating copies larger than the L2) and hot; achieved
  GB/s = bytes the kernel must read ÷ time, against a measured device-to-device copy bandwidth;
- `decode`: a tiny random Llama (made here: BPE tokenizer trained from a string, random AQLM codes) compiled by
  the build plan (`build(ckpt, "cuda", ...)`) and decoded greedily by `TvmDecoder` on the GPU and by the PyTorch reference on the CPU;
- `quantize`: `quantize --device cuda` of one Llama-2-7B-shaped block (random weights, made here), time per phase,
  with `--nproc 2` over NCCL where two GPUs are visible, next to the CPU run of the same block and settings
  (`benchmarks/quantize_memory.py`'s record, where the checkout has one).

Results: DIR/gpu.json (rewritten atomically after every section, so a timeout still leaves what finished) and
DIR/gpu.md. Without a GPU the command says so and exits 2, unless `--dry-run`: then everything that needs no GPU
runs (every CUDA build, checked for device code) and the sections are recorded as skipped, with the reason; the
libraries it built land in DIR/prebuilt/ (`prebuilt.json` lists them), and `--prebuilt DIR/prebuilt` runs them on
a GPU machine whose TVM has no compiler (runtime-only: `libtvm_runtime.so` + `libtvm_runtime_cuda.so`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

SCHEMA = "aqlm-compile/gpu-bench/1"
SECTIONS = ("numerics", "kernels", "decode", "quantize")
# The quantize section: the first block of a random model with Llama-2-7B block shapes, the settings of the CPU run
# of benchmarks/quantize_memory.py at its smaller window count (so the two are side by side).
QUANTIZE_WINDOWS, QUANTIZE_SEQLEN = 64, 2048
# the block stage is timed: not the fast preset's end-to-end epoch (global_epochs) over the whole model
QUANTIZE_SETTINGS = ("max_rounds=1", "kmeans_iters=4", "finetune_epochs=1", "finetune_max_steps=4", "val_size=8",
                     "global_epochs=0")
QUANTIZE_TIMEOUT_S = 240
NUMERICS_CONFIGS = ("1x16g8", "2x8g8", "1x8g8", "8x8g32", "2x12g8", "4x8g16", "2x8g4", "3x6g8", "2x16g8")
NUMERICS_SHAPE = (512, 1024)  # out, in: small, divisible by every config's group size
KERNEL_CONFIGS = ("2x8g8", "1x16g8")
LLAMA_SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008), (28672, 8192))
QUICK_SHAPES = ((4096, 4096), (11008, 4096))
TOLERANCE = 1e-5  # max |y - ref| / max |ref|, fp32 activations: as tests/kernels/test_build.py checks the kernels
DECODE_CONFIG = "2x8g8"
DECODE_TOKENS = 16
DECODE_PROMPT = "The quick brown fox"
TINY_MODEL = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=False, max_position_embeddings=256,
                  initializer_range=0.5)  # wide logits: 16 distinct greedy tokens, top-2 gaps ≫ fp32 noise
PORTABLE_ARCHS = ("sm_80", "sm_86", "sm_89", "sm_90")
PORTABLE_PTX = "compute_90"
# Sources whose change makes a prebuilt folder stale (compared by sha256 when one is used).
SOURCES = ("kernels/gemv_cuda.py", "kernels/registry.py", "targets/cuda.py", "targets/relax.py", "targets/common.py",
           "aqlm_compile/bench/gpu.py")


class _Done(Exception):
    """A section that needs no build finished early."""


class Skip(Exception):
    """A section (or part) that cannot run here, with the reason: recorded as skipped, not as an error."""


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:400]


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


# --- the machine -------------------------------------------------------------------------------------------------
def _run(cmd: list[str]) -> str | None:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _nvcc_path() -> str | None:
    roots = (os.environ.get("CUDA_PATH"), os.environ.get("CUDA_HOME"), "/usr/local/cuda")
    for c in (shutil.which("nvcc"), *(str(Path(r) / "bin" / "nvcc") for r in roots if r)):
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return c
    return None


def machine_info(gpu: dict) -> dict:
    import torch

    try:
        import tvm
        tvm_version = tvm.__version__
    except ImportError:
        tvm_version = None
    nvcc = _nvcc_path()
    nvcc_version = _run([nvcc, "--version"]) if nvcc else None
    if nvcc_version:
        nvcc_version = next((ln.strip() for ln in nvcc_version.splitlines() if "release" in ln), nvcc_version[-80:])
    info = {"gpu": gpu.get("name"), "gpu_memory_mib": gpu.get("memory_mib"), "compute_capability": gpu.get("cc"),
            "driver": gpu.get("driver"), "cuda_runtime": torch.version.cuda, "nvcc": nvcc_version,
            "cpu": _cpu_model(), "cpu_cores": os.cpu_count(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "python": platform.python_version(),
            "torch": torch.__version__, "tvm": tvm_version}
    info["slug"] = machine_slug(info)
    return info


def machine_slug(info: dict) -> str:
    """benchmarks/results/<slug>/: the GPU's name (e.g. nvidia-h200); on a machine without one, dry-run-<cpu>."""
    return slug(info["gpu"]) if info.get("gpu") else "dry-run-" + slug(info.get("cpu") or "cpu")


def _load_cuda_runtime() -> str | None:
    """Load TVM's CUDA runtime sidecar if it is not loaded yet (TVM skips it in runtime-only mode); None when
    loaded, else why not."""
    try:
        from tvm.base import _LOADED_LIBS
        from tvm_ffi.libinfo import load_lib_ctypes
    except ImportError as exc:
        return one_line(exc)
    if "tvm_runtime_cuda" in _LOADED_LIBS:
        return None
    runtime_dir = Path(_LOADED_LIBS["tvm_runtime"]._name).resolve().parent
    try:
        _LOADED_LIBS["tvm_runtime_cuda"] = load_lib_ctypes(package="tvm", target_name="tvm_runtime_cuda",
                                                           extra_lib_paths=[runtime_dir], mode="RTLD_LOCAL")
    except (OSError, FileNotFoundError, RuntimeError) as exc:
        return f"libtvm_runtime_cuda.so not loadable ({one_line(exc)})"
    return None


def detect_gpu(load_tvm_runtime: bool = True) -> dict:
    """What torch, nvidia-smi and TVM see. `visible` if any of them sees an NVIDIA GPU; `why_not` says what each
    said otherwise."""
    import torch

    gpu, notes = {"visible": False, "torch_cuda": False, "tvm_cuda": False}, []
    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        props = torch.cuda.get_device_properties(0)
        gpu.update(visible=True, torch_cuda=True, name=torch.cuda.get_device_name(0),
                   memory_mib=props.total_memory // (1 << 20), cc=f"{props.major}.{props.minor}",
                   l2_bytes=getattr(props, "L2_cache_size", None), sms=props.multi_processor_count)
    else:
        notes.append(f"torch {torch.__version__}: torch.cuda.is_available() is False")
    smi = _run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,compute_cap",
                "--format=csv,noheader,nounits"])
    if smi:
        name, driver, mem, cc = ([p.strip() for p in smi.splitlines()[0].split(",")] + [None] * 4)[:4]
        gpu.setdefault("name", name)
        gpu["driver"] = driver
        gpu.setdefault("cc", cc)
        if mem and mem.isdigit():
            gpu.setdefault("memory_mib", int(mem))
        gpu["visible"] = True
    else:
        notes.append("nvidia-smi: not found or failed")
    if load_tvm_runtime:
        why = _load_cuda_runtime()
        if why is None:
            import tvm

            dev = tvm.cuda(0)
            if dev.exist:
                gpu.update(visible=True, tvm_cuda=True)
                gpu.setdefault("name", dev.device_name)
                gpu.setdefault("cc", dev.compute_version)
            else:
                notes.append("TVM: tvm.cuda(0) does not exist")
        else:
            notes.append(f"TVM: {why}")
    gpu["why_not"] = "; ".join(notes)
    return gpu


def compiler_available() -> str | None:
    """None when TVM's compiler (and so the CUDA builds) can run here, else why not."""
    try:
        import tvm
        from tvm.base import _RUNTIME_ONLY
    except ImportError as exc:
        return one_line(exc)
    if _RUNTIME_ONLY:
        return f"TVM {tvm.__version__} is runtime-only here (no libtvm_compiler.so)"
    if _nvcc_path() is None:
        return "nvcc not found (PATH, $CUDA_PATH/bin, $CUDA_HOME/bin, /usr/local/cuda/bin)"
    return None


def sources_sha256() -> dict:
    root = Path(__file__).resolve().parents[2]
    out = {}
    for rel in SOURCES:
        p = root / rel
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
    return out


# --- builds (TVM compiler + nvcc; no GPU needed) -------------------------------------------------------------------
def _compile_cuda(funcs: dict, path: Path, archs, ptx) -> None:
    """One IRModule of PrimFuncs -> one exported library, checked for device code of every arch (and the PTX)."""
    import tvm

    from aqlm_compile.targets.cuda import (_multi_arch_compiler, check_device_code, cuda_target, ensure_cuda_codegen,
                                           find_nvcc)

    find_nvcc()
    ensure_cuda_codegen()
    target = cuda_target(max(archs, key=lambda a: int(a[3:])))
    with _multi_arch_compiler(archs, ptx), target:
        lib = tvm.compile(tvm.IRModule(funcs), target=target)
    if lib.mod.imports and lib.mod.imports[0].kind != "cuda":
        raise RuntimeError(f"TVM produced a {lib.mod.imports[0].kind!r} device module, not a compiled CUDA one")
    path.parent.mkdir(parents=True, exist_ok=True)
    lib.export_library(str(path))
    check_device_code(path, archs, ptx)


def _kernel_func(cfg_name: str, out_f: int, in_f: int, batch: int, symbol: str):
    """(PrimFunc, kernel name, reason) of the registry's CUDA choice; ConfigError/NotImplementedError if none."""
    from aqlm_compile.config import AqlmConfig
    from aqlm_compile.kernels.gemv_direct import GemvShape
    from aqlm_compile.kernels.registry import select_kernel

    shape = GemvShape(out_f, in_f, AqlmConfig.parse(cfg_name), batch)
    choice = select_kernel(shape, "cuda")
    return choice.build_func(shape, symbol), choice.name, choice.reason


def build_numerics(dest: Path, archs, ptx, log=print) -> dict:
    from aqlm_compile.kernels.registry import MAX_GEMV_BATCH

    out_f, in_f = NUMERICS_SHAPE
    batches = (1, MAX_GEMV_BATCH)
    configs, funcs = {}, {}
    for cfg in NUMERICS_CONFIGS:
        try:
            entry = {"supported": True, "symbols": {}}
            cfg_funcs = {}
            for b in batches:
                sym = f"numerics_{cfg}_b{b}"
                cfg_funcs[sym], entry["kernel"], entry["reason"] = _kernel_func(cfg, out_f, in_f, b, sym)
                entry["symbols"][str(b)] = sym
            funcs[cfg] = cfg_funcs
            configs[cfg] = entry
        except Exception as exc:  # noqa: BLE001 - the registry's or the schedule's refusal, recorded as the reason
            configs[cfg] = {"supported": False, "reason": one_line(exc)}
    lib = dest / "kernels_numerics.so"
    t = time.perf_counter()
    try:
        _compile_cuda({k: f for fs in funcs.values() for k, f in fs.items()}, lib, archs, ptx)
    except Exception as exc:  # noqa: BLE001
        if "nvcc not found" in str(exc):
            raise Skip(one_line(exc)) from None
        log(f"numerics: the joint build failed ({one_line(exc)}); building config by config")
        for cfg in list(funcs):
            try:
                _compile_cuda(funcs[cfg], dest / f"probe_{cfg}.so", archs, ptx)
            except Exception as exc2:  # noqa: BLE001
                configs[cfg] = {"supported": False, "reason": f"CUDA build failed: {one_line(exc2)}"}
                del funcs[cfg]
            finally:
                (dest / f"probe_{cfg}.so").unlink(missing_ok=True)
        _compile_cuda({k: f for fs in funcs.values() for k, f in fs.items()}, lib, archs, ptx)
    return {"library": lib.name, "shape": [out_f, in_f], "batches": list(batches), "configs": configs,
            "build_s": round(time.perf_counter() - t, 1)}


def kernel_rows(quick: bool) -> list[dict]:
    shapes = QUICK_SHAPES if quick else LLAMA_SHAPES
    batches = (1,) if quick else (1, 4)
    return [{"config": cfg, "out_features": o, "in_features": i, "batch": b, "symbol": f"gemv_{cfg}_{o}x{i}_b{b}"}
            for (o, i) in shapes for cfg in KERNEL_CONFIGS for b in batches]


def build_kernels(dest: Path, archs, ptx, quick: bool) -> dict:
    rows, funcs = kernel_rows(quick), {}
    for r in rows:
        funcs[r["symbol"]], r["kernel"], _ = _kernel_func(r["config"], r["out_features"], r["in_features"], r["batch"],
                                                          r["symbol"])
    t = time.perf_counter()
    try:
        _compile_cuda(funcs, dest / "kernels_llama.so", archs, ptx)
    except Exception as exc:  # noqa: BLE001
        if "nvcc not found" in str(exc):
            raise Skip(one_line(exc)) from None
        raise
    return {"library": "kernels_llama.so", "rows": rows, "build_s": round(time.perf_counter() - t, 1)}


TOKENIZER_TEXT = """The quick brown fox jumps over the lazy dog. A stitch in time saves nine.
All that glitters is not gold. The early bird catches the worm. Actions speak louder than words.
Every cloud has a silver lining. Fortune favours the bold. Knowledge is power. Time is money.
Where there is a will there is a way. Practice makes perfect. Better late than never.
"""


def tiny_tokenizer(folder: Path):
    """A byte-level BPE tokenizer (256 tokens) trained from TOKENIZER_TEXT, saved into `folder`: no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([TOKENIZER_TEXT * 20], trainers.BpeTrainer(
        vocab_size=256, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(folder)
    return fast


def make_7b_block_model(root: Path, seed: int = 0, shapes: dict | None = None,
                        tokens: int = QUANTIZE_WINDOWS * QUANTIZE_SEQLEN) -> tuple[Path, Path]:
    """(FP folder, calibration text file): one decoder block of Llama-2-7B shapes with random fp16 weights and the
    tiny tokenizer, and a text of shuffled TOKENIZER_TEXT words long enough for the quantize section's windows."""
    import random

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from aqlm_compile.bench.synthetic import LLAMA2_7B

    fp_dir = root / "fp-7b-block"
    fp_dir.mkdir(parents=True, exist_ok=True)
    fast = tiny_tokenizer(fp_dir)
    config = AutoConfig.for_model("llama", vocab_size=len(fast), bos_token_id=fast.bos_token_id,
                                  eos_token_id=fast.eos_token_id, num_hidden_layers=1, tie_word_embeddings=False,
                                  **(shapes or LLAMA2_7B))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float16)
    model.save_pretrained(fp_dir)
    words = TOKENIZER_TEXT.split()
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(words) for _ in range(16)) for _ in range(tokens // 8)]
    corpus = root / "calibration.txt"
    corpus.write_text("\n".join(lines) + "\n")
    return fp_dir, corpus


def _cpu_quantize_figure() -> dict | None:
    """The CPU run of the same block and settings (benchmarks/quantize_memory.py), where this checkout has one."""
    for path in sorted(Path("benchmarks/results").glob("*/quantize-memory-llama2-7b-shapes.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        rows = [r for r in data.get("rows", []) if r.get("windows") == QUANTIZE_WINDOWS and r.get("exit_status") == 0]
        if rows:
            return {"file": str(path), "cpu": data.get("machine", {}).get("cpu"),
                    "cores": data.get("machine", {}).get("cores"), "wall_s": rows[0]["wall_s"],
                    "phases_s": rows[0].get("phases_s"), "peak_rss_bytes": rows[0].get("peak_rss_bytes")}
    return None


def run_quantize(work: Path, device: str = "cuda", shapes: dict | None = None, windows: int = QUANTIZE_WINDOWS,
                 seqlen: int = QUANTIZE_SEQLEN) -> dict:
    """`quantize --device cuda` of one Llama-2-7B-shaped block (and with `--nproc 2` over NCCL where 2 GPUs are
    visible: the same checkpoint is expected; and `--nproc 2 --shard-windows`: the windows split too, the
    checkpoint equal within rounding), timed per phase, next to this checkout's CPU figure."""
    import torch

    fp_dir, corpus = make_7b_block_model(work, shapes=shapes, tokens=windows * seqlen)
    base = [sys.executable, "-m", "aqlm_compile", "quantize", str(fp_dir), "--preset", "fast", "--num-blocks", "1",
            "--nsamples", str(windows), "--seqlen", str(seqlen), "--dataset", str(corpus),
            "--device", device, "--quiet"] + [a for kv in QUANTIZE_SETTINGS for a in ("--set", kv)]
    runs = {}
    for label, extra in (("1 process", []), ("2 processes (NCCL)", ["--nproc", "2"]),
                         ("2 processes, --shard-windows (NCCL)", ["--nproc", "2", "--shard-windows"])):
        if extra and (device != "cuda" or torch.cuda.device_count() < 2):
            runs[label] = {"skipped": f"{torch.cuda.device_count()} GPU visible; 2 processes need 2"}
            continue
        out = work / f"q-{len(runs)}"
        t = time.perf_counter()
        proc = subprocess.run(base + ["-o", str(out)] + extra, capture_output=True, text=True,
                              timeout=QUANTIZE_TIMEOUT_S)
        wall = time.perf_counter() - t
        if proc.returncode != 0:
            runs[label] = {"error": (proc.stderr.strip().splitlines() or ["exit " + str(proc.returncode)])[-1][:300]}
            continue
        report = json.loads((out / "quantize_report.json").read_text())
        runs[label] = {"wall_s": round(wall, 1), "phases_s": report["timings"],
                       "block_seconds": [b["seconds"] for b in report["blocks"]],
                       "sha256": hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()}
    # the bit-for-bit claim is the linears-only split's (--shard-windows sums in another order)
    digests = [r["sha256"] for label, r in runs.items() if "sha256" in r and "shard" not in label]
    return {"device": device, "windows": windows, "seqlen": seqlen, "settings": list(QUANTIZE_SETTINGS),
            "runs": runs, "same_checkpoint": len(set(digests)) == 1 if len(digests) > 1 else None,
            "cpu": _cpu_quantize_figure()}


def make_tiny_checkpoint(root: Path, config: str = DECODE_CONFIG, seed: int = 0) -> Path:
    """A random Llama (BPE tokenizer trained from a string: no download) with every block linear replaced by random
    AQLM codes, scaled to the random weights' row norms, saved as an AQLM checkpoint. Returns its folder."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    from aqlm_compile import format as fmt
    from aqlm_compile.config import AqlmConfig
    from aqlm_compile.nn import AqlmLinear

    fp_dir = root / "fp"
    fp_dir.mkdir(parents=True, exist_ok=True)
    fast = tiny_tokenizer(fp_dir)
    hf_config = AutoConfig.for_model("llama", vocab_size=len(fast), bos_token_id=fast.bos_token_id,
                                     eos_token_id=fast.eos_token_id, **TINY_MODEL)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    model.save_pretrained(fp_dir)
    cfg = AqlmConfig.parse(config)
    gen = torch.Generator().manual_seed(seed)
    m, k, g = cfg.num_codebooks, cfg.codebook_size, cfg.in_group_size
    for name, lin in [(n, mod) for n, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)]:
        if ".layers." not in f".{name}.":
            continue
        codes = torch.randint(0, k, (lin.out_features, lin.in_features // g, m), generator=gen)
        books = (torch.randn(m, k, 1, g, generator=gen) * 0.05).half().float()
        decoded = AqlmLinear.from_parts(codes, books, torch.ones(lin.out_features), cfg).weight().detach()
        scales = (lin.weight.detach().norm(dim=1) / decoded.norm(dim=1).clamp_min(1e-6)).half().float()
        fmt.replace_module(model, name, AqlmLinear.from_parts(codes, books, scales, cfg))
    ckpt = fmt.save(root / "ckpt", model, cfg, source_dir=fp_dir, metadata={"made_by": "aqlm_compile.bench.gpu"})
    shutil.rmtree(fp_dir, ignore_errors=True)  # the checkpoint holds the tokenizer too
    return ckpt


def build_decode(dest: Path, archs, ptx) -> dict:
    from aqlm_compile.errors import ConfigError
    from aqlm_compile.targets.plan import build
    from aqlm_compile.targets.registry import BuildOptions

    t = time.perf_counter()
    ckpt = make_tiny_checkpoint(dest / "tiny")
    made = time.perf_counter() - t
    try:
        build(ckpt, "cuda", BuildOptions(archs=tuple(archs), ptx_arch=ptx, max_batch=1), dest / "tiny" / "artifact")
    except ConfigError as exc:
        if "nvcc not found" in str(exc):
            raise Skip(one_line(exc)) from None
        raise
    return {"artifact": "tiny/artifact", "config": DECODE_CONFIG, "model": dict(TINY_MODEL, arch="llama"),
            "make_checkpoint_s": round(made, 1), "build_s": round(time.perf_counter() - t - made, 1)}


BUILDERS = {"numerics": build_numerics, "kernels": build_kernels, "decode": build_decode}


# --- runs on the GPU ---------------------------------------------------------------------------------------------
def numerics_inputs(cfg_name: str, out_f: int, in_f: int, batch: int, seed: int = 0):
    """(x f32 [N, in], codes as stored (signed) [out, in/g, M], codebooks f16 [M, K, g], scales f32 [out],
    float64 reference y [N, out] from the torch decode)."""
    import torch

    from aqlm_compile.config import AqlmConfig
    from aqlm_compile.nn import decode_weight, pack_codes

    cfg = AqlmConfig.parse(cfg_name)
    rng = np.random.default_rng(seed)
    m, k, g = cfg.num_codebooks, cfg.codebook_size, cfg.in_group_size
    codes_u = rng.integers(0, k, (out_f, in_f // g, m), dtype=np.int64)
    books = (rng.standard_normal((m, k, g)) * 0.1).astype(np.float16)
    scales = (rng.random(out_f) + 0.5).astype(np.float32)
    x = rng.standard_normal((batch, in_f)).astype(np.float32)
    stored = pack_codes(torch.from_numpy(codes_u), cfg.nbits_per_codebook).numpy()
    w = decode_weight(torch.from_numpy(codes_u), torch.from_numpy(books.astype(np.float64)).unsqueeze(2),
                      torch.from_numpy(scales.astype(np.float64)).view(-1, 1, 1, 1))
    ref = (torch.from_numpy(x.astype(np.float64)) @ w.T).numpy()
    return x, stored, books, scales, ref


def run_numerics(mod, dev, info: dict, log=print) -> list[dict]:
    """Every supported config's kernels of `info` (build_numerics' record), run from the loaded module `mod` on
    `dev`, against the torch reference. Unsupported configs are recorded with the reason."""
    import tvm

    out_f, in_f = info["shape"]
    records = []
    for cfg, entry in info["configs"].items():
        if not entry["supported"]:
            records.append({"config": cfg, "supported": False, "reason": entry["reason"]})
            continue
        for b, sym in entry["symbols"].items():
            rec = {"config": cfg, "supported": True, "kernel": entry.get("kernel"), "batch": int(b),
                   "out_features": out_f, "in_features": in_f}
            try:
                x, codes, books, scales, ref = numerics_inputs(cfg, out_f, in_f, int(b))
                args = [tvm.runtime.tensor(np.ascontiguousarray(a), dev)
                        for a in (x, codes, books, scales, np.zeros(out_f, np.float32))]
                y = tvm.runtime.empty((int(b), out_f), "float32", dev)
                mod[sym](*args, y)
                dev.sync()
                got = y.numpy().astype(np.float64)
                err = float(np.abs(got - ref).max())
                rel = err / max(float(np.abs(ref).max()), 1e-30)
                rec.update(max_abs_err=err, max_rel_err=rel, tolerance=TOLERANCE, passed=bool(rel <= TOLERANCE))
            except Exception as exc:  # noqa: BLE001
                rec.update(passed=False, error=one_line(exc))
            log(f"numerics {cfg} b{b}: " + (f"rel err {rec['max_rel_err']:.2e} {'ok' if rec['passed'] else 'FAIL'}"
                                            if "max_rel_err" in rec else rec["error"]))
            records.append(rec)
    return records


def kernel_read_bytes(cfg_name: str, out_f: int, in_f: int, batch: int) -> int:
    """Bytes an AQLM GEMV must read: codes + fp16 codebooks + fp32 scales + fp32 x."""
    from aqlm_compile.config import AqlmConfig

    from .kernels import kernel_bytes

    return kernel_bytes(AqlmConfig.parse(cfg_name), out_f, in_f) + batch * in_f * 4


def dense_read_bytes(out_f: int, in_f: int, batch: int) -> int:
    return out_f * in_f * 2 + batch * in_f * 2


def _graph_ms(launches, replays: int = 10) -> float:
    """Per-launch ms of `launches` captured into one CUDA graph (TVM kernels on torch's capture stream), replayed."""
    import torch
    import tvm_ffi

    for f in launches[:3]:
        f()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with tvm_ffi.use_torch_stream(torch.cuda.graph(graph)):
        for f in launches:
            f()
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / len(launches))
    del graph
    return statistics.median(times)


def _events_ms(launches, reps: int = 5) -> float:
    """Per-launch ms of a plain launch loop between CUDA events (launch overhead included)."""
    import torch
    import tvm_ffi

    times = []
    with tvm_ffi.use_torch_stream():
        for f in launches[:3]:
            f()
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for f in launches:
                f()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / len(launches))
    return statistics.median(times)


def time_launches(launches) -> tuple[float, str]:
    try:
        return _graph_ms(launches), "cuda_graph"
    except Exception as exc:  # noqa: BLE001 - graph capture refused: fall back to a timed launch loop
        return _events_ms(launches), f"events_loop (graph capture failed: {one_line(exc)[:120]})"


COPY_BYTES = 1 << 30


def copy_bandwidth_gbs(torch_cuda: bool, dev) -> dict:
    """Device-to-device copy of COPY_BYTES (1 GiB), bytes read + written per second (best of 5)."""
    nbytes = COPY_BYTES
    if torch_cuda:
        import torch

        src = torch.ones(nbytes // 4, dtype=torch.float32, device="cuda")
        dst = torch.empty_like(src)
        dst.copy_(src)
        best = float("inf")
        for _ in range(5):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            dst.copy_(src)
            b.record()
            b.synchronize()
            best = min(best, a.elapsed_time(b) / 1e3)
        del src, dst
        torch.cuda.empty_cache()
        method = "torch copy_, CUDA events"
    else:
        import tvm

        src = tvm.runtime.empty((nbytes // 4,), "float32", dev)
        dst = tvm.runtime.empty((nbytes // 4,), "float32", dev)
        src.copyto(dst)
        dev.sync()
        best = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            src.copyto(dst)
            dev.sync()
            best = min(best, time.perf_counter() - t)
        method = "TVM copyto, host timer"
    return {"gbs": 2 * nbytes / best / 1e9, "bytes": nbytes, "method": method}


def run_kernels(mod, dev, info: dict, gpu: dict, deadline: float, log=print) -> dict:
    """Each row of `info` (build_kernels' record): our kernel vs cuBLAS FP16, L2-cold (rotating copies, together
    > 3x the L2) and hot, CUDA graphs + events; plus TVM's time_evaluator of our kernel (hot, launch included)."""
    import tvm

    torch_cuda = gpu.get("torch_cuda", False)
    bw = copy_bandwidth_gbs(torch_cuda, dev)
    log(f"device-to-device copy: {bw['gbs']:.0f} GB/s ({bw['method']})")
    l2 = gpu.get("l2_bytes") or 64 << 20
    records = []
    rng = np.random.default_rng(0)
    for row in info["rows"]:
        cfg_name, out_f, in_f, batch = row["config"], row["out_features"], row["in_features"], row["batch"]
        rec = {k: row.get(k) for k in ("config", "out_features", "in_features", "batch", "kernel")}
        rec["act_dtype"] = "float32"
        if row.get("missing"):
            rec["error"] = f"{row['symbol']}: not in the built library (a --quick prebuilt folder?)"
            records.append(rec)
            continue
        if time.monotonic() > deadline:
            rec["skipped"] = "time budget spent"
            records.append(rec)
            continue
        try:
            from aqlm_compile.config import AqlmConfig

            cfg = AqlmConfig.parse(cfg_name)
            m, k, g = cfg.num_codebooks, cfg.codebook_size, cfg.in_group_size
            half = 1 << (cfg.nbits_per_codebook - 1)
            codes = rng.integers(-half, half, (out_f, in_f // g, m)).astype(cfg.code_dtype_name)
            books = (rng.standard_normal((m, k, g)) * 0.1).astype(np.float16)
            scales = rng.random(out_f).astype(np.float32)
            x = rng.standard_normal((batch, in_f)).astype(np.float32)
            ours_bytes = kernel_read_bytes(cfg_name, out_f, in_f, batch)
            copies = max(1, min(64, -(-3 * l2 // ours_bytes)))
            sets = [[tvm.runtime.tensor(a, dev) for a in (x, codes, books, scales, np.zeros(out_f, np.float32))]
                    for _ in range(copies)]
            y = tvm.runtime.empty((batch, out_f), "float32", dev)
            fn = mod[row["symbol"]]
            ev = mod.time_evaluator(row["symbol"], dev, number=20, repeat=5)(*sets[0], y)
            rec["ms_tvm_evaluator_hot"] = statistics.median(ev.results) * 1e3
            rec["bytes"] = ours_bytes
            if torch_cuda:
                import torch

                n = copies * -(-40 // copies)
                rec["ms"], rec["timing"] = time_launches([lambda s=sets[i % copies]: fn(*s, y) for i in range(n)])
                rec["ms_hot"], _ = time_launches([lambda: fn(*sets[0], y)] * 40)
                rec["l2_rotation_copies"] = copies
                dense_b = dense_read_bytes(out_f, in_f, batch)
                dcopies = max(1, min(64, -(-3 * l2 // dense_b)))
                ws = [torch.randn(out_f, in_f, device="cuda", dtype=torch.float16) * 0.02 for _ in range(dcopies)]
                xt = torch.randn(batch, in_f, device="cuda", dtype=torch.float16)
                yt = torch.empty(batch, out_f, device="cuda", dtype=torch.float16)
                dn = dcopies * -(-40 // dcopies)
                rec["cublas_ms"], rec["cublas_timing"] = time_launches(
                    [lambda w=ws[i % dcopies]: torch.mm(xt, w.t(), out=yt) for i in range(dn)])
                rec["cublas_ms_hot"], _ = time_launches([lambda: torch.mm(xt, ws[0].t(), out=yt)] * 40)
                rec["cublas_bytes"] = dense_b
                rec["gbs"] = ours_bytes / (rec["ms"] * 1e-3) / 1e9
                rec["cublas_gbs"] = dense_b / (rec["cublas_ms"] * 1e-3) / 1e9
                rec["speedup_vs_cublas"] = rec["cublas_ms"] / rec["ms"]
                rec["fraction_of_copy_bw"] = rec["gbs"] / bw["gbs"]
                del ws, xt, yt
                torch.cuda.empty_cache()
                log(f"{cfg_name} {out_f}x{in_f} b{batch}: {rec['ms'] * 1e3:.1f} us ({rec['gbs']:.0f} GB/s) vs cuBLAS "
                    f"fp16 {rec['cublas_ms'] * 1e3:.1f} us ({rec['cublas_gbs']:.0f} GB/s) -> "
                    f"{rec['speedup_vs_cublas']:.2f}x; hot {rec['ms_hot'] * 1e3:.1f} us")
            else:
                rec["ms"], rec["timing"] = rec["ms_tvm_evaluator_hot"], "tvm time_evaluator (hot)"
                rec["gbs"] = ours_bytes / (rec["ms"] * 1e-3) / 1e9
                rec["cublas_error"] = "torch sees no CUDA device here (a CPU build of torch?): no cuBLAS baseline"
                log(f"{cfg_name} {out_f}x{in_f} b{batch}: {rec['ms'] * 1e3:.1f} us (hot, time_evaluator)")
            sets = None  # free the device copies before the next shape
        except Exception as exc:  # noqa: BLE001
            rec["error"] = one_line(exc)
            log(f"{cfg_name} {out_f}x{in_f} b{batch}: {rec['error']}")
        records.append(rec)
    return {"copy_bandwidth_gbs": bw["gbs"], "copy_bandwidth_method": bw["method"], "l2_bytes": l2,
            "records": records}


def decode_compare(gpu_decoder, ref_decoder, tokenizer, n: int = DECODE_TOKENS, prompt: str = DECODE_PROMPT) -> dict:
    """Greedy decode of `n` tokens with both decoders (the first one twice: cold, then warm); same tokens, speeds
    and the prefill logits' difference."""
    from aqlm_compile.runtime.generate import encode_prompt, generate

    cold = generate(gpu_decoder, tokenizer, prompt, max_new_tokens=n, stop_at_eos=False)
    warm = generate(gpu_decoder, tokenizer, prompt, max_new_tokens=n, stop_at_eos=False)
    ref = generate(ref_decoder, tokenizer, prompt, max_new_tokens=n, stop_at_eos=False)
    # Lockstep, both fed the reference's tokens: the logits' largest difference over every step, and the smallest
    # top-2 gap of the reference (a divergence where that gap is within the difference is a near-tie, not a bug).
    ids = np.array(encode_prompt(tokenizer, prompt, ref_decoder.bos_token_id, True), np.int64)
    gpu_decoder.reset()
    ref_decoder.reset()
    diffs, gaps, prefill = [], [], None
    for step_ids in [ids] + [np.array([t], np.int64) for t in ref["new_tokens"][:-1]]:
        a, b = gpu_decoder.step(step_ids).astype(np.float64), ref_decoder.step(step_ids).astype(np.float64)
        diffs.append(float(np.abs(a - b).max()))
        top = np.sort(b)[-2:]
        gaps.append(float(top[1] - top[0]))
        prefill = prefill if prefill is not None else (diffs[0], float(np.abs(b).max()))
    diverge = next((i for i, (p, q) in enumerate(zip(warm["new_tokens"], ref["new_tokens"])) if p != q), None)
    return {"prompt": prompt, "new_tokens": n, "tokens": warm["new_tokens"], "reference_tokens": ref["new_tokens"],
            "same_tokens": warm["new_tokens"] == ref["new_tokens"] and cold["new_tokens"] == ref["new_tokens"],
            "first_divergence": diverge, "tokens_per_s": warm["tokens_per_s"],
            "tokens_per_s_first_run": cold["tokens_per_s"], "reference_tokens_per_s": ref["tokens_per_s"],
            "prefill_logits_max_abs_diff": prefill[0], "prefill_logits_max_abs": prefill[1],
            "logits_max_abs_diff": max(diffs), "min_top2_gap": min(gaps)}


def run_decode(build_dir: Path, info: dict) -> dict:
    from aqlm_compile.runtime.generate import load_tokenizer
    from aqlm_compile.runtime.torch_runtime import TorchDecoder
    from aqlm_compile.runtime.tvm_runtime import TvmDecoder

    art = build_dir / info["artifact"]
    rec = decode_compare(TvmDecoder(art), TorchDecoder(art), load_tokenizer(art / "weights"))
    rec.update(gpu_runtime="TvmDecoder (Relax VM, CUDA)", reference_runtime="TorchDecoder (PyTorch, CPU, fp32)",
               config=info["config"], model=info["model"])
    return rec


# --- the report --------------------------------------------------------------------------------------------------
def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [f"# GPU benchmark ({report['mode']})", "",
             (f"{m['gpu']} (cc {m.get('compute_capability')}, {m.get('gpu_memory_mib')} MiB, driver "
              f"{m.get('driver')}, CUDA {m.get('cuda_runtime')})" if m.get("gpu") else "no GPU")
             + f"; {m.get('cpu')} × {m.get('cpu_cores')}; "
             f"torch {m.get('torch')}, TVM {m.get('tvm')}; {m.get('date')}. Builds: {report['build'].get('source')} "
             f"for {', '.join(report['build'].get('archs') or [])}"
             f"{' + ' + report['build']['ptx'] if report['build'].get('ptx') else ''}.", ""]
    secs = report["sections"]
    for name in SECTIONS:
        s = secs.get(name)
        lines.append(f"## {name}")
        lines.append("")
        if s is None:
            lines += ["not run", ""]
            continue
        if s["status"] != "ok":
            lines += [f"**{s['status']}**: {s.get('reason') or s.get('error')}", ""]
        if s.get("build"):
            b = s["build"]
            lines += [f"Build: {b.get('library') or b.get('artifact')}"
                      + (f", {b['build_s']} s" if b.get("build_s") is not None else "")
                      + (f"; unsupported configs: {s['unsupported']}" if s.get("unsupported") else ""), ""]
        if name == "numerics" and s.get("records"):
            lines += [f"Shape {s.get('shape')}, fp32 activations, tolerance max|y−ref| / max|ref| ≤ {TOLERANCE:g} "
                      "(reference: torch decode in float64).", "",
                      "| config | kernel | batch | max abs err | max rel err | pass |", "|---|---|---|---|---|---|"]
            for r in s["records"]:
                if not r.get("supported"):
                    lines.append(f"| {r['config']} | unsupported: {r['reason']} | – | – | – | – |")
                elif "max_rel_err" in r:
                    lines.append(f"| {r['config']} | {r['kernel']} | {r['batch']} | {r['max_abs_err']:.2e} | "
                                 f"{r['max_rel_err']:.2e} | {'yes' if r['passed'] else '**NO**'} |")
                else:
                    lines.append(f"| {r['config']} | {r['kernel']} | {r['batch']} | error: {r.get('error')} | – "
                                 "| – |")
        if name == "kernels" and s.get("records"):
            lines += [f"Device-to-device copy: **{s['copy_bandwidth_gbs']:.0f} GB/s** ({s['copy_bandwidth_method']}). "
                      "Times per call from CUDA-graph replay, weights L2-cold (rotating copies) unless marked hot; "
                      "GB/s = bytes the kernel must read ÷ time (AQLM: codes + codebooks + scales + x; dense: fp16 "
                      "weight + x).", "",
                      "| config | out×in | batch | ours µs | ours GB/s | cuBLAS fp16 µs | cuBLAS GB/s | × cuBLAS | "
                      "ours hot µs | cuBLAS hot µs | ours % of copy BW |", "|---" * 11 + "|"]
            for r in s["records"]:
                head = f"| {r['config']} | {r['out_features']}×{r['in_features']} | {r['batch']} |"
                if "error" in r or "skipped" in r:
                    lines.append(f"{head} {r.get('error') or r.get('skipped')} | | | | | | | |")
                    continue
                fmt = lambda v, k=1e3: f"{v * k:.1f}" if isinstance(v, (int, float)) else "–"  # noqa: E731
                lines.append(f"{head} {fmt(r.get('ms'))} | {fmt(r.get('gbs'), 1)} | {fmt(r.get('cublas_ms'))} | "
                             f"{fmt(r.get('cublas_gbs'), 1)} | "
                             f"{'**%.2f**' % r['speedup_vs_cublas'] if 'speedup_vs_cublas' in r else '–'} | "
                             f"{fmt(r.get('ms_hot'))} | {fmt(r.get('cublas_ms_hot'))} | "
                             f"{fmt(r.get('fraction_of_copy_bw'), 100)} |")
        if name == "decode" and s.get("record"):
            r = s["record"]
            tps = lambda v: f"{v:.1f}" if v else "–"  # noqa: E731
            lines += [f"Tiny random Llama {r['model']}, {r['config']}, greedy, prompt {r['prompt']!r}.", "",
                      "| tokens | same tokens as PyTorch | first divergence | TVM CUDA tokens/s (warm) | first run | "
                      "PyTorch CPU tokens/s | logits max abs diff (lockstep) | smallest top-2 gap |",
                      "|---|---|---|---|---|---|---|---|",
                      f"| {r['new_tokens']} | {'yes' if r['same_tokens'] else '**NO**'} | {r['first_divergence']} | "
                      f"{tps(r['tokens_per_s'])} | {tps(r['tokens_per_s_first_run'])} | "
                      f"{tps(r['reference_tokens_per_s'])} | {r['logits_max_abs_diff']:.2e} | "
                      f"{r['min_top2_gap']:.3f} |"]
        if name == "quantize" and s.get("record"):
            r = s["record"]
            lines += [f"`quantize --device cuda` of one Llama-2-7B-shaped block (random weights), {r['windows']} × "
                      f"{r['seqlen']} tokens, `--preset fast` with {', '.join(r['settings'])}.", "",
                      "| run | wall s | capture / hessian / AQ / block FT / forward (s) | per block s |",
                      "|---|---|---|---|"]
            cpu = r.get("cpu")
            rows = list(r["runs"].items())
            if cpu:
                rows.append((f"CPU: {cpu['cpu']}, {cpu['cores']} cores ({cpu['file']})",
                             {"wall_s": cpu["wall_s"], "phases_s": cpu.get("phases_s") or {}}))
            for label, run in rows:
                if "wall_s" not in run:
                    lines.append(f"| {label} | {run.get('skipped') or run.get('error')} | | |")
                    continue
                p = run["phases_s"]
                phases = " / ".join(f"{p.get(k, 0):.1f}" for k in ("capture", "hessian", "aq", "block_ft", "forward"))
                per = ", ".join(f"{x:.1f}" for x in run.get("block_seconds", [])) or "–"
                lines.append(f"| {label} | {run['wall_s']:.1f} | {phases} | {per} |")
            if r.get("same_checkpoint") is not None:
                lines += ["", f"1 and 2 processes wrote the same checkpoint: {'yes' if r['same_checkpoint'] else '**no**'}."]
        lines.append("")
    return "\n".join(lines)


def write_report(out: Path, report: dict) -> None:
    from aqlm_compile.cache import atomic_write_bytes

    atomic_write_bytes(out / "gpu.json", (json.dumps(report, indent=1) + "\n").encode())
    atomic_write_bytes(out / "gpu.md", markdown(report).encode())


# --- main --------------------------------------------------------------------------------------------------------
def _arch_of(gpu: dict) -> str | None:
    cc = gpu.get("cc")
    return f"sm_{cc.replace('.', '')}" if cc else None


def _prebuilt_fits(build: dict, arch: str | None) -> str | None:
    """None if libraries built for `build['archs']` (+ PTX) load on a GPU of `arch`, else why not."""
    if arch is None or arch in build["archs"]:
        return None
    ptx = build.get("ptx")
    if ptx and int(arch[3:]) >= int(ptx.split("_")[1]):
        return None
    return f"prebuilt for {', '.join(build['archs'])}{' + ' + ptx if ptx else ''}; this GPU is {arch}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m aqlm_compile.bench.gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="results folder (default: benchmarks/results/<gpu slug>)")
    p.add_argument("--quick", action="store_true", help="2 Llama shapes at batch 1 (default: 4 shapes, batch 1 and 4)")
    p.add_argument("--dry-run", action="store_true", help="no GPU needed: build everything, record sections as skipped")
    p.add_argument("--archs", help="comma-separated sm_XY to build for (default: this GPU's; dry run: "
                                   f"{','.join(PORTABLE_ARCHS)} + {PORTABLE_PTX} PTX)")
    p.add_argument("--ptx", help="PTX arch to embed (e.g. compute_90; 'none' for none)")
    p.add_argument("--prebuilt", help="a dry run's DIR/prebuilt: its libraries are used when TVM cannot compile here")
    p.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset of " + ",".join(SECTIONS))
    p.add_argument("--budget-s", type=float, default=420.0, help="stop starting timed rows after this many seconds")
    args = p.parse_args(argv)
    start = time.monotonic()
    deadline = start + args.budget_s
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = [s for s in sections if s not in SECTIONS]
    if bad:
        print(f"error: --sections {','.join(bad)}: expected some of {','.join(SECTIONS)}", file=sys.stderr)
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import torch  # noqa: F401
        import tvm  # noqa: F401
    except ImportError as exc:
        print(f"error: this python ({sys.executable}) lacks {exc.name or exc}: the GPU benchmark needs torch and tvm",
              file=sys.stderr)
        return 2

    gpu = detect_gpu(load_tvm_runtime=not args.dry_run)  # a dry run builds with the stub driver: load nothing
    if not args.dry_run and not gpu["visible"]:
        print(f"no NVIDIA GPU visible ({gpu['why_not']}); `--dry-run` builds everything without one", file=sys.stderr)
        return 2
    if not args.dry_run and not gpu.get("tvm_cuda"):
        print(f"error: an NVIDIA GPU is visible ({gpu.get('name')}) but TVM cannot use it ({gpu['why_not']})",
              file=sys.stderr)
        return 2
    info = machine_info(gpu)
    out = Path(args.out) if args.out else Path("benchmarks") / "results" / info["slug"]
    out.mkdir(parents=True, exist_ok=True)
    arch = _arch_of(gpu) if not args.dry_run else None
    if args.archs:
        archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    else:
        archs = [arch] if arch else list(PORTABLE_ARCHS)
    ptx = args.ptx if args.ptx else (None if (arch and not args.archs) else PORTABLE_PTX)
    ptx = None if ptx in (None, "none") else ptx
    for a in archs:
        if not re.fullmatch(r"sm_\d+", a):
            print(f"error: --archs {a!r}: expected sm_XY (e.g. sm_80, sm_90)", file=sys.stderr)
            return 2

    why_no_compiler = compiler_available()
    prebuilt_dir = Path(args.prebuilt) if args.prebuilt else None
    if why_no_compiler is None:
        build_dir = out / "prebuilt" if args.dry_run else Path(tempfile.mkdtemp(prefix="aqlm-gpu-bench-"))
        if args.dry_run and build_dir.exists():
            shutil.rmtree(build_dir)
        build = {"source": "compiled here", "archs": archs, "ptx": ptx, "tvm": info["tvm"],
                 "sources_sha256": sources_sha256(), "quick": args.quick}
    elif prebuilt_dir is not None and (prebuilt_dir / "prebuilt.json").is_file() and not args.dry_run:
        build_dir = prebuilt_dir
        build = json.loads((prebuilt_dir / "prebuilt.json").read_text())
        build["source"] = f"prebuilt ({prebuilt_dir})"
        then = build.get("sources_sha256", {})
        stale = [k for k, v in sources_sha256().items() if v and then.get(k) not in (None, v)]
        build["stale_sources"] = stale
        if stale:
            print(f"warning: the prebuilt libraries predate changes to {', '.join(stale)}", file=sys.stderr)
    else:
        build_dir, build = None, {"source": None, "archs": archs, "ptx": ptx, "why_no_build": why_no_compiler}
    report = {"schema": SCHEMA, "mode": "dry-run" if args.dry_run else "gpu", "quick": args.quick, "machine": info,
              "gpu": {k: v for k, v in gpu.items() if k != "visible"}, "build": build,
              "sections": {}, "seconds": None, "results": str(out)}
    print(f"{'dry run' if args.dry_run else info['gpu']}: results in {out}; builds: "
          f"{build.get('source') or 'none (' + why_no_compiler + ')'}", flush=True)
    dev = None
    if not args.dry_run:
        import tvm

        dev = tvm.cuda(0)
        fits = _prebuilt_fits(build, arch) if (build.get("source") or "").startswith("prebuilt") else None
        if fits:
            build_dir, build["why_no_build"] = None, fits

    for name in sections:
        t0 = time.monotonic()
        sec: dict = {}
        try:
            if name == "quantize":  # no TVM build: torch on the GPU
                if args.dry_run:
                    raise Skip("dry run: quantize runs only on a GPU" +
                               ("" if gpu["visible"] else f" (no NVIDIA GPU visible: {gpu['why_not']})"))
                work = Path(tempfile.mkdtemp(prefix="aqlm-gpu-quantize-"))
                try:
                    sec["record"] = run_quantize(work)
                finally:
                    shutil.rmtree(work, ignore_errors=True)
                sec["status"] = "ok"
                raise _Done
            if build_dir is None:
                raise Skip(f"no CUDA build: {build.get('why_no_build')}; no usable --prebuilt folder")
            if build.get("source") == "compiled here":
                print(f"[{name}] building for {','.join(archs)}{' + ' + ptx if ptx else ''} ...", flush=True)
                kwargs = {"quick": args.quick} if name == "kernels" else {}
                build[name] = BUILDERS[name](build_dir, archs, ptx, **kwargs)
            binfo = build.get(name)
            if binfo is None:
                raise Skip(f"the prebuilt folder has no {name} build")
            sec["build"] = {k: v for k, v in binfo.items() if k not in ("rows", "configs")}
            if name == "numerics":
                sec["shape"] = binfo["shape"]
                sec["unsupported"] = {c: e["reason"] for c, e in binfo["configs"].items() if not e["supported"]}
            if args.dry_run:
                raise Skip("dry run: built and device code checked, not run" +
                           ("" if gpu["visible"] else f" (no NVIDIA GPU visible: {gpu['why_not']})"))
            import tvm

            if name == "numerics":
                mod = tvm.runtime.load_module(str(build_dir / binfo["library"]))
                sec["records"] = run_numerics(mod, dev, binfo)
                failed = [f"{r['config']} b{r.get('batch')}" for r in sec["records"]
                          if r.get("supported") and not r.get("passed")]
                sec["all_passed"] = not failed
                if failed:
                    sec["failed"] = failed
            elif name == "kernels":
                mod = tvm.runtime.load_module(str(build_dir / binfo["library"]))
                built = {r["symbol"]: r for r in binfo["rows"]}  # a prebuilt folder may hold more (or fewer) rows
                rows = [built.get(r["symbol"], dict(r, missing=True)) for r in kernel_rows(args.quick)]
                sec.update(run_kernels(mod, dev, {"rows": rows}, gpu, deadline))
            else:
                sec["record"] = run_decode(build_dir, binfo)
            sec["status"] = "ok"
        except _Done:
            pass
        except Skip as exc:
            sec["status"], sec["reason"] = "skipped", str(exc)
        except Exception as exc:  # noqa: BLE001 - one line in the report; the other sections still run
            sec["status"], sec["error"] = "error", one_line(exc)
        sec["seconds"] = round(time.monotonic() - t0, 1)
        report["sections"][name] = sec
        why = "" if sec["status"] == "ok" else ": " + (sec.get("reason") or sec.get("error") or "")
        print(f"[{name}] {sec['status']}{why} ({sec['seconds']} s)", flush=True)
        report["seconds"] = round(time.monotonic() - start, 1)
        write_report(out, report)

    if args.dry_run and build.get("source") == "compiled here":
        from aqlm_compile.cache import atomic_write_bytes

        keep = {k: v for k, v in build.items() if k != "source"}
        atomic_write_bytes(build_dir / "prebuilt.json", (json.dumps(keep, indent=1) + "\n").encode())
    elif build_dir is not None and build.get("source") == "compiled here":
        shutil.rmtree(build_dir, ignore_errors=True)
    report["seconds"] = round(time.monotonic() - start, 1)
    write_report(out, report)
    print(f"wrote {out / 'gpu.json'} and {out / 'gpu.md'} ({report['seconds']} s)", flush=True)
    statuses = {s["status"] for s in report["sections"].values()}
    numerics_failed = report["sections"].get("numerics", {}).get("all_passed") is False
    decode_differs = report["sections"].get("decode", {}).get("record", {}).get("same_tokens") is False
    return 1 if "error" in statuses or numerics_failed or decode_differs else 0


if __name__ == "__main__":
    sys.exit(main())
