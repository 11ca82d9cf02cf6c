"""Kernel benchmark: each AQLM kernel vs torch dense fp32 (and the `aqlm` package's CPU kernel), same process,
interleaved rounds, median of medians. Hot = weights in cache; cold = after streaming a buffer larger than L3.
The memory-bandwidth bound is the bytes the kernel must read ÷ a measured copy bandwidth."""

from __future__ import annotations

import os
import statistics
import time

import numpy as np

from ..config import AqlmConfig

LLAMA_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (28672, 8192)]
SMOLLM2_SHAPES = [(576, 576), (1536, 576), (576, 1536)]


def _median_ms(fn, calls: int, flush=None) -> float:
    times = []
    for _ in range(calls):
        if flush is not None:
            flush()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def measure_bandwidth_gbs() -> float:
    src = np.ones(64 << 20, dtype=np.float32)  # 256 MB
    dst = np.empty_like(src)
    best = min(_timed(lambda: np.copyto(dst, src)) for _ in range(3))
    return 2 * src.nbytes / best / 1e9


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def kernel_bytes(cfg: AqlmConfig, out_f: int, in_f: int) -> int:
    code_bytes = 1 if cfg.nbits_per_codebook <= 8 else 2
    return out_f * (in_f // cfg.in_group_size) * cfg.num_codebooks * code_bytes + \
        cfg.num_codebooks * cfg.codebook_size * cfg.in_group_size * 2 + out_f * 4


def _aqlm_package_kernel(cfg: AqlmConfig, x, codes, cb, scales):
    """The `aqlm` package's CPU kernel (numba LUT, Kx8 only), with one numba thread: it races with more."""
    if cfg.nbits_per_codebook != 8:
        return None
    try:
        import numba
        import torch
        from aqlm.inference_kernels.numba_kernel import numba_gemm_lut
    except ImportError:
        return None
    numba.set_num_threads(1)
    xt = torch.from_numpy(x)
    codes_t = torch.from_numpy(np.ascontiguousarray(codes.transpose(1, 0, 2)))  # its CPU layout [in/g, out, M]
    cb_t = torch.from_numpy(cb.astype(np.float32)).unsqueeze(2)
    sc_t = torch.from_numpy(scales).view(-1, 1, 1, 1)
    return lambda: numba_gemm_lut(xt, codes_t, cb_t, sc_t, None)


def bench_kernels(shapes, configs, batches, rounds: int = 3, calls: int = 20, with_aqlm_package: bool = True,
                  log=print) -> list[dict]:
    import torch
    import tvm

    from aqlm_compile.kernels.gemv_direct import GemvShape
    from aqlm_compile.kernels.registry import select_kernel
    from aqlm_compile.targets.x86 import build, x86_target

    torch.set_num_threads(os.cpu_count() or 1)
    target = x86_target()
    dev = tvm.cpu()
    bw = measure_bandwidth_gbs()
    flush_buf = np.ones(48 << 20, dtype=np.float32)  # 192 MB > L3
    flush = lambda: float(flush_buf[::4096].sum()) + flush_buf.sum()  # noqa: E731
    records = []
    rng = np.random.default_rng(0)
    for out_f, in_f in shapes:
        dense = torch.randn(out_f, in_f) * 0.02
        for cfg_name in configs:
            cfg = AqlmConfig.parse(cfg_name)
            j = in_f // cfg.in_group_size
            codes = rng.integers(-(1 << (cfg.nbits_per_codebook - 1)), 1 << (cfg.nbits_per_codebook - 1),
                                 (out_f, j, cfg.num_codebooks)).astype(cfg.code_dtype_name)
            cb = (rng.standard_normal((cfg.num_codebooks, cfg.codebook_size, cfg.in_group_size)) * 0.1).astype(np.float16)
            scales = rng.random(out_f).astype(np.float32)
            bias = np.zeros(out_f, np.float32)
            for batch in batches:
                shape = GemvShape(out_f, in_f, cfg, batch)
                choice = select_kernel(shape, "llvm")
                lib = build(choice.build_func(shape, "k"), target)
                x = rng.standard_normal((batch, in_f)).astype(np.float32)
                args = [tvm.runtime.tensor(a, dev) for a in (x, codes, cb, scales, bias)]
                y = tvm.runtime.empty((batch, out_f), "float32", dev)
                fn = lib["k"]
                xt = torch.from_numpy(x)
                dense_fn = lambda: torch.matmul(xt, dense.T)  # noqa: E731
                runs = {"aqlm": [], "dense": [], "aqlm_cold": [], "dense_cold": []}
                for _ in range(rounds):
                    for _ in range(3):
                        fn(*args, y), dense_fn()
                    runs["aqlm"].append(_median_ms(lambda: fn(*args, y), calls))
                    runs["dense"].append(_median_ms(dense_fn, calls))
                    runs["aqlm_cold"].append(_median_ms(lambda: fn(*args, y), max(3, calls // 4), flush))
                    runs["dense_cold"].append(_median_ms(dense_fn, max(3, calls // 4), flush))
                ms = {k: statistics.median(v) for k, v in runs.items()}
                ref_fn = _aqlm_package_kernel(cfg, x, codes, cb, scales) if with_aqlm_package else None
                if ref_fn is not None:
                    fn(*args, y)
                    agree = np.abs(ref_fn().numpy() - y.numpy()).max() / max(np.abs(y.numpy()).max(), 1e-30)
                    for _ in range(2):
                        ref_fn()
                    ms["aqlm_package"] = statistics.median(_median_ms(ref_fn, calls) for _ in range(rounds))
                lb_ms = kernel_bytes(cfg, out_f, in_f) / (bw * 1e9) * 1e3
                rec = {"config": cfg_name, "out_features": out_f, "in_features": in_f, "batch": batch,
                       "target": f"llvm/{target.attrs['mcpu']}", "kernel": choice.name, "ms": ms["aqlm"],
                       "ms_cold": ms["aqlm_cold"], "baseline": "torch dense fp32", "baseline_ms": ms["dense"],
                       "baseline_ms_cold": ms["dense_cold"], "speedup": ms["dense"] / ms["aqlm"],
                       "bandwidth_bound_ms": lb_ms, "measured_bandwidth_gbs": bw}
                if "aqlm_package" in ms:
                    rec.update({"aqlm_package_ms": ms["aqlm_package"], "aqlm_package_rel_diff": float(agree),
                                "speedup_vs_aqlm_package": ms["aqlm_package"] / ms["aqlm"]})
                extra = f"; aqlm pkg {ms['aqlm_package']:.3f} ms" if "aqlm_package" in ms else ""
                log(f"{cfg_name:>7} {out_f}x{in_f} b{batch}: {ms['aqlm']:.3f} ms (cold {ms['aqlm_cold']:.3f}) vs dense "
                    f"{ms['dense']:.3f} ms -> {rec['speedup']:.2f}x; bound {lb_ms:.3f} ms{extra}")
                records.append(rec)
    return records
