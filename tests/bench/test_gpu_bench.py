"""`bash benchmarks/gpu.sh` / `python -m aqlm_compile.bench.gpu` on a machine without a GPU: the dry run (every CUDA
build, device code checked from the file) and the report's schema; of the GPU-side harness, what a CPU can run:
the numerics check against CPU kernels loaded by the TVM runtime alone, and the decode comparison."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tvm")

from aqlm_compile.bench import gpu  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


def _has_nvcc() -> bool:
    return gpu._nvcc_path() is not None


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-bench") / "out"
    t = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "aqlm_compile.bench.gpu", "--dry-run", "--quick", "--out", str(out),
                           "--archs", "sm_90", "--ptx", "none"], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=170)
    return proc, out, time.monotonic() - t


def test_dry_run_writes_the_report_with_every_section_skipped_with_a_reason(dry_run):
    proc, out, seconds = dry_run
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert f"wrote {out / 'gpu.json'}" in proc.stdout
    report = json.loads((out / "gpu.json").read_text())
    assert report["schema"] == gpu.SCHEMA and report["mode"] == "dry-run" and report["quick"] is True
    for key in ("gpu", "driver", "cuda_runtime", "cpu", "cpu_cores", "date", "torch", "tvm", "slug", "nvcc"):
        assert key in report["machine"], key
    assert report["machine"]["cpu"] and report["machine"]["date"]
    assert report["machine"]["slug"] == gpu.machine_slug(report["machine"])
    assert set(report["sections"]) == set(gpu.SECTIONS)
    for name, sec in report["sections"].items():
        assert sec["status"] == "skipped", (name, sec)
        assert sec["reason"].strip(), name  # a skipped section always says why
        assert isinstance(sec["seconds"], float)
        assert "records" not in sec and "record" not in sec  # nothing ran, so nothing is reported as measured
    md = (out / "gpu.md").read_text()
    assert all(f"## {name}" in md for name in gpu.SECTIONS) and "**skipped**" in md
    built = {k: s for k, s in report["sections"].items() if k != "quantize"}  # quantize needs no build
    assert report["sections"]["quantize"]["reason"].startswith("dry run: quantize runs only on a GPU")
    if not _has_nvcc():
        assert all("nvcc" in s["reason"] for s in built.values())
        return
    assert report["build"]["source"] == "compiled here" and report["build"]["archs"] == ["sm_90"]
    assert all("dry run: built and device code checked" in s["reason"] for s in built.values())


def test_dry_run_builds_real_device_code_for_every_section(dry_run):
    if not _has_nvcc():
        pytest.skip("no CUDA toolkit here: the dry run records the builds as skipped (checked above)")
    from aqlm_compile.targets.cuda import device_code_inventory

    _, out, _ = dry_run
    pre = out / "prebuilt"
    build = json.loads((pre / "prebuilt.json").read_text())
    assert build["archs"] == ["sm_90"] and build["ptx"] is None and build["sources_sha256"]["kernels/gemv_cuda.py"]
    # numerics: every config listed, supported ones with a symbol per batch, the others with the reason
    configs = build["numerics"]["configs"]
    assert list(configs) == list(gpu.NUMERICS_CONFIGS)
    for cfg, entry in configs.items():
        if entry["supported"]:
            assert set(entry["symbols"]) == {"1", "8"} and entry["kernel"] == "gemv_cuda", cfg
        else:
            assert entry["reason"].strip(), cfg
    assert configs["2x8g8"]["supported"] and configs["1x16g8"]["supported"]
    # kernels: the quick rows (2 Llama shapes x 2 configs, batch 1)
    rows = build["kernels"]["rows"]
    assert {(r["config"], r["out_features"], r["in_features"], r["batch"]) for r in rows} == {
        (c, o, i, 1) for o, i in gpu.QUICK_SHAPES for c in gpu.KERNEL_CONFIGS}
    for lib in ("kernels_numerics.so", "kernels_llama.so", "tiny/artifact/model_cuda.so",
                "tiny/artifact/kernels_cuda.so"):
        inv = device_code_inventory(pre / lib)
        assert {(e["kind"], e["sm"]) for e in inv} == {("sass", 90)}, lib
    manifest = json.loads((pre / "tiny" / "artifact" / "manifest.json").read_text())
    assert manifest["target"] == "cuda" and manifest["aqlm_config"] == gpu.DECODE_CONFIG
    assert manifest["tvm"]["device"] == "cuda"
    # The prebuilt libraries load in a runtime-only TVM (no compiler), once gpu.py has loaded TVM's CUDA sidecar —
    # here over the stub driver, as a GPU machine with a runtime-only TVM would over the real one.
    from aqlm_compile.targets.cuda import _stub_libcuda

    code = ("import ctypes, sys, tvm\n"
            f"ctypes.CDLL({str(_stub_libcuda())!r}, mode=ctypes.RTLD_GLOBAL)\n"
            "from aqlm_compile.bench import gpu\n"
            "assert tvm.base._RUNTIME_ONLY and gpu._load_cuda_runtime() is None\n"
            f"m = tvm.runtime.load_module({str(pre / 'kernels_numerics.so')!r})\n"
            "m['numerics_2x8g8_b8']\n"
            f"m = tvm.runtime.load_module({str(pre / 'kernels_llama.so')!r})\n"
            f"m[{rows[0]['symbol']!r}]\n"
            f"tvm.runtime.load_module({str(pre / 'tiny' / 'artifact' / 'model_cuda.so')!r})\n"
            "print('loaded')\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=pre, capture_output=True, text=True, timeout=120,
                          env={**ENV, "TVM_USE_RUNTIME_LIB": "1"})
    assert proc.returncode == 0 and proc.stdout.strip() == "loaded", proc.stderr[-3000:]


def test_without_a_gpu_it_says_so_and_exits_2(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible here")
    proc = subprocess.run([sys.executable, "-m", "aqlm_compile.bench.gpu", "--out", str(tmp_path / "o")], cwd=REPO,
                          env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("no NVIDIA GPU visible ("), proc.stderr
    assert not (tmp_path / "o" / "gpu.json").exists()


def test_gpu_sh_is_valid_bash():
    script = REPO / "benchmarks" / "gpu.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    r = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "gpu.json" in r.stdout and "--prepare" in r.stdout
    text = script.read_text()
    assert "timeout" in text and "aqlm_compile.bench.gpu" in text


def test_numerics_harness_on_cpu_kernels_with_the_runtime_only(tmp_path):
    """run_numerics — the code the GPU runs — against CPU kernels, in a process that loads TVM's runtime only (as a
    GPU machine with a prebuilt folder does): every config passes, and a kernel given the wrong config is caught."""
    import tvm

    from aqlm_compile.config import AqlmConfig
    from aqlm_compile.kernels.gemv_direct import GemvShape
    from aqlm_compile.kernels.registry import select_kernel
    from aqlm_compile.targets.x86 import x86_target

    out_f, in_f = gpu.NUMERICS_SHAPE
    funcs, configs = {}, {}
    for cfg in ("2x8g8", "1x16g8", "3x6g8"):
        entry = {"supported": True, "kernel": None, "symbols": {}}
        for b in (1, 3):
            sym = f"numerics_{cfg}_b{b}"
            choice = select_kernel(GemvShape(out_f, in_f, AqlmConfig.parse(cfg), b), "llvm")
            funcs[sym] = choice.build_func(GemvShape(out_f, in_f, AqlmConfig.parse(cfg), b), sym)
            entry["kernel"], entry["symbols"][str(b)] = choice.name, sym
        configs[cfg] = entry
    configs["2x8g4"] = {"supported": True, "kernel": "mismatch", "symbols": {"1": "numerics_2x8g8_b1"}}
    configs["2x16g8"] = {"supported": False, "reason": "example refusal"}
    tvm.compile(tvm.IRModule(funcs), target=x86_target()).export_library(str(tmp_path / "k.so"))
    info = {"shape": [out_f, in_f], "configs": configs}
    (tmp_path / "info.json").write_text(json.dumps(info))
    code = ("import json, sys, tvm\n"
            "from aqlm_compile.bench import gpu\n"
            "assert tvm.base._RUNTIME_ONLY and gpu.compiler_available()\n"
            f"info = json.load(open({str(tmp_path / 'info.json')!r}))\n"
            f"lib = tvm.runtime.load_module({str(tmp_path / 'k.so')!r})\n"
            "recs = gpu.run_numerics(lib, tvm.cpu(), info, log=lambda *a: None)\n"
            "gpu.COPY_BYTES = 1 << 24\n"
            "rows = [{'config': '2x8g8', 'out_features': info['shape'][0], 'in_features': info['shape'][1], 'batch': 1,"
            " 'symbol': 'numerics_2x8g8_b1', 'kernel': 'gemv_direct'}]\n"
            "k = gpu.run_kernels(lib, tvm.cpu(), {'rows': rows}, {'torch_cuda': False, 'l2_bytes': 1 << 20},"
            " deadline=float('inf'), log=lambda *a: None)\n"
            "late = gpu.run_kernels(lib, tvm.cpu(), {'rows': rows}, {'torch_cuda': False}, deadline=0.0,"
            " log=lambda *a: None)\n"
            "assert 'aqlm_compile.kernels.registry' not in sys.modules  # no compiler-side import on this path\n"
            "print(json.dumps({'kernels': k, 'late': late}))\n"
            "print(json.dumps(recs))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**ENV, "TVM_USE_RUNTIME_LIB": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = json.loads(proc.stdout.strip().splitlines()[-1])
    # run_kernels without torch CUDA: our kernel timed by TVM's time_evaluator, no cuBLAS baseline, said so
    kern = json.loads(proc.stdout.strip().splitlines()[-2])
    (row,) = kern["kernels"]["records"]
    assert "error" not in row, row
    assert row["ms"] == row["ms_tvm_evaluator_hot"] > 0 and row["gbs"] > 0 and "cublas_error" in row
    assert row["bytes"] == gpu.kernel_read_bytes("2x8g8", out_f, in_f, 1)
    assert kern["kernels"]["copy_bandwidth_gbs"] > 0 and "TVM copyto" in kern["kernels"]["copy_bandwidth_method"]
    assert kern["late"]["records"][0]["skipped"] == "time budget spent"
    good = [r for r in recs if r["config"] in ("2x8g8", "1x16g8", "3x6g8")]
    assert len(good) == 6 and all(r["passed"] and r["max_rel_err"] <= gpu.TOLERANCE for r in good), good
    assert all(r["tolerance"] == gpu.TOLERANCE and r["max_abs_err"] >= 0 for r in good)
    bad = next(r for r in recs if r["config"] == "2x8g4")
    assert bad["passed"] is False and "error" in bad  # wrong shapes for that kernel: reported, not a crash
    assert next(r for r in recs if r["config"] == "2x16g8") == {"config": "2x16g8", "supported": False,
                                                                "reason": "example refusal"}
    md = gpu.markdown({"mode": "gpu", "machine": {}, "build": {"archs": ["sm_90"]}, "sections": {
        "numerics": {"status": "ok", "shape": [out_f, in_f], "records": recs}}})
    assert "| 2x8g8 | gemv_" in md and "unsupported: example refusal" in md


def test_decode_comparison_and_reference_inputs(dry_run, tmp_path):
    """decode_compare (what the GPU run uses) on two PyTorch decoders of the tiny model: same 16 tokens."""
    from aqlm_compile.runtime.generate import load_tokenizer
    from aqlm_compile.runtime.torch_runtime import TorchDecoder

    _, out, _ = dry_run
    ckpt = out / "prebuilt" / "tiny" / "ckpt"
    if not (ckpt / "config.json").is_file():  # no nvcc: the dry run built nothing
        ckpt = gpu.make_tiny_checkpoint(tmp_path / "tiny")
    rec = gpu.decode_compare(TorchDecoder(ckpt), TorchDecoder(ckpt), load_tokenizer(ckpt), n=gpu.DECODE_TOKENS)
    assert rec["same_tokens"] and rec["first_divergence"] is None and len(rec["tokens"]) == gpu.DECODE_TOKENS
    assert rec["tokens_per_s"] > 0 and rec["prefill_logits_max_abs_diff"] == 0.0 == rec["logits_max_abs_diff"]
    # a model that says something, with clear winners, so "same tokens" on the GPU means something
    assert len(set(rec["tokens"])) >= 8 and rec["min_top2_gap"] > 1e-2
    md = gpu.markdown({"mode": "gpu", "machine": {}, "build": {"archs": ["sm_90"]}, "sections": {
        "decode": {"status": "ok", "record": dict(rec, config="2x8g8", model=gpu.TINY_MODEL)}}})
    assert f"| {gpu.DECODE_TOKENS} | yes | None |" in md
    # the reference of the numerics check is the torch decode: codes stored signed, decoded as unsigned
    x, codes, books, scales, ref = gpu.numerics_inputs("2x8g8", 16, 32, 2)
    assert codes.dtype == np.int8 and codes.min() < 0 and ref.shape == (2, 16)
    u = codes.astype(np.int64) % 256
    w = (books[0][u[..., 0]].astype(np.float64) + books[1][u[..., 1]]).reshape(16, 32) * scales[:, None]
    np.testing.assert_allclose(ref, x.astype(np.float64) @ w.T, rtol=1e-12, atol=1e-12)


def test_helpers():
    assert gpu.machine_slug({"gpu": "NVIDIA H200"}) == "nvidia-h200"
    assert gpu.machine_slug({"gpu": None, "cpu": "AMD EPYC 9R14 96-Core"}) == "dry-run-amd-epyc-9r14-96-core"
    build = {"archs": ["sm_80", "sm_90"], "ptx": "compute_90"}
    assert gpu._prebuilt_fits(build, "sm_90") is None and gpu._prebuilt_fits(build, "sm_100") is None
    assert "sm_86" in gpu._prebuilt_fits(build, "sm_86")
    assert "sm_100" in gpu._prebuilt_fits({"archs": ["sm_90"], "ptx": None}, "sm_100")
    rows = gpu.kernel_rows(quick=False)
    assert len(rows) == len(gpu.LLAMA_SHAPES) * len(gpu.KERNEL_CONFIGS) * 2
    assert len({r["symbol"] for r in rows}) == len(rows)
    assert gpu.kernel_read_bytes("2x8g8", 4096, 4096, 1) == 4096 * 512 * 2 + 2 * 256 * 8 * 2 + 4096 * 4 + 4096 * 4
    assert gpu.dense_read_bytes(4096, 4096, 1) == 4096 * 4096 * 2 + 4096 * 2


def test_markdown_of_a_gpu_run():
    """The tables a GPU run writes, from records shaped as run_kernels writes them."""
    ok = {"config": "2x8g8", "out_features": 4096, "in_features": 4096, "batch": 1, "kernel": "gemv_cuda",
          "ms": 0.02, "gbs": 210.0, "cublas_ms": 0.012, "cublas_gbs": 2800.0, "speedup_vs_cublas": 0.6,
          "ms_hot": 0.015, "cublas_ms_hot": 0.008, "fraction_of_copy_bw": 0.05}
    bad = {"config": "1x16g8", "out_features": 4096, "in_features": 4096, "batch": 1, "kernel": "gemv_cuda",
           "error": "RuntimeError: boom"}
    md = gpu.markdown({"mode": "gpu", "machine": {"gpu": "NVIDIA H200"}, "build": {"archs": ["sm_90"]}, "sections": {
        "kernels": {"status": "ok", "copy_bandwidth_gbs": 4300.0, "copy_bandwidth_method": "torch copy_",
                    "records": [ok, bad]},
        "decode": {"status": "error", "error": "FormatError: x"}}})
    assert "| 2x8g8 | 4096×4096 | 1 | 20.0 | 210.0 | 12.0 | 2800.0 | **0.60** | 15.0 | 8.0 | 5.0 |" in md
    assert "| 1x16g8 | 4096×4096 | 1 | RuntimeError: boom |" in md and "**error**: FormatError: x" in md
    assert "4300 GB/s" in md and "## numerics\n\nnot run" in md


def test_quantize_section_markdown_puts_the_cpu_run_beside_the_gpu_runs():
    record = {"windows": 64, "seqlen": 2048, "settings": ["max_rounds=1"], "same_checkpoint": True,
              "runs": {"1 process": {"wall_s": 30.0, "block_seconds": [20.5], "sha256": "a",
                                     "phases_s": {"capture": 1, "hessian": 2, "aq": 10, "block_ft": 3, "forward": 2}},
                       "2 processes (NCCL)": {"skipped": "1 GPU visible; 2 processes need 2"}},
              "cpu": {"file": "benchmarks/results/x/quantize-memory-llama2-7b-shapes.json", "cpu": "AMD EPYC",
                      "cores": 2, "wall_s": 1800.0, "phases_s": {"hessian": 700, "aq": 300}}}
    md = gpu.markdown({"mode": "gpu", "machine": {"gpu": "NVIDIA H200"}, "build": {"archs": ["sm_90"]},
                       "sections": {"quantize": {"status": "ok", "record": record}}})
    assert "| 1 process | 30.0 | 1.0 / 2.0 / 10.0 / 3.0 / 2.0 | 20.5 |" in md
    assert "| 2 processes (NCCL) | 1 GPU visible; 2 processes need 2 |" in md
    assert "| CPU: AMD EPYC, 2 cores (benchmarks/results/x/quantize-memory-llama2-7b-shapes.json) | 1800.0 |" in md
    assert "wrote the same checkpoint: yes" in md


def test_the_block_model_and_its_corpus_are_made_offline(tmp_path):
    """At tiny shapes (the section's default is Llama-2-7B's: 400 MB to write)."""
    tiny = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4)
    fp_dir, corpus = gpu.make_7b_block_model(tmp_path, shapes=tiny)
    config = json.loads((fp_dir / "config.json").read_text())
    assert (config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]) == (64, 128, 1)
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(fp_dir)(corpus.read_text())["input_ids"]
    assert len(ids) * 4 // 5 >= gpu.QUANTIZE_WINDOWS * gpu.QUANTIZE_SEQLEN  # the calibration part fills the windows


def test_the_quantize_section_runs_its_cli_and_reads_the_report(tmp_path):
    """The section's command line and report parsing, on the CPU at tiny shapes (on a GPU: --device cuda)."""
    tiny = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4,
                max_position_embeddings=256)
    rec = gpu.run_quantize(tmp_path, device="cpu", shapes=tiny, windows=12, seqlen=32)
    one = rec["runs"]["1 process"]
    assert "error" not in one, one
    assert one["wall_s"] > 0 and len(one["block_seconds"]) == 1 and one["phases_s"]["aq"] >= 0
    assert "skipped" in rec["runs"]["2 processes (NCCL)"] and rec["same_checkpoint"] is None
    assert "skipped" in rec["runs"]["2 processes, --shard-windows (NCCL)"]
