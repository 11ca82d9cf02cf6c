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


SETTLE_S = 0.2


def _median_ms(fn, calls: int, flush=None) -> float:
    # Let the other library's thread pool go idle first: OpenMP (torch) and TVM workers spin for a while after a
    # parallel region and would steal the 2 cores from the kernel being timed.
    time.sleep(SETTLE_S)
    for _ in range(2):
        fn()
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


def _aqlm_package_kernel(cfg: AqlmConfig, x, codes, cb, scales, threads: int = 1):
    """The `aqlm` package's CPU kernel (numba LUT, Kx8 only), with `threads` numba threads (the same count as ours
    in the report; its parallel loop races on the output with more than one — the result is checked and reported)."""
    if cfg.nbits_per_codebook != 8:
        return None
    try:
        import numba
        import torch
        from aqlm.inference_kernels.numba_kernel import numba_gemm_lut
    except ImportError:
        return None
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    xt = torch.from_numpy(x)
    codes_t = torch.from_numpy(np.ascontiguousarray(codes.transpose(1, 0, 2)))  # its CPU layout [in/g, out, M]
    cb_t = torch.from_numpy(cb.astype(np.float32)).unsqueeze(2)
    sc_t = torch.from_numpy(scales).view(-1, 1, 1, 1)
    return lambda: numba_gemm_lut(xt, codes_t, cb_t, sc_t, None)


def _alternatives(shape, choice_name: str, features=frozenset()) -> dict:
    """Other CPU kernels that could serve this shape, timed too so the registry's choice is visible in the record."""
    from aqlm_compile.kernels import gemv_lut_vbmi
    from aqlm_compile.kernels.gemv_direct import gemv_direct
    from aqlm_compile.kernels.gemv_lut import GROUP_MAJOR, OUT_MAJOR, gemv_lut, gemv_lut_grouped, gemv_lut_split

    if shape.batch > 8:
        return {}
    alts = {"gemv_direct": (gemv_direct, OUT_MAJOR)}
    if shape.config.codebook_size <= 256:
        alts["gemv_lut"] = (gemv_lut, OUT_MAJOR)
        alts["gemv_lut_grouped"] = (gemv_lut_grouped, GROUP_MAJOR)
        alts["gemv_lut_split"] = (gemv_lut_split, OUT_MAJOR)
    if set(gemv_lut_vbmi.REQUIRED_FEATURES) <= set(features) and gemv_lut_vbmi.unsupported(shape) is None:
        alts["gemv_lut_vbmi"] = (gemv_lut_vbmi.gemv_lut_vbmi, gemv_lut_vbmi.ROW_TILED)
    # a spec's name may differ from its builder's (gemv_lut_split_avx2 builds gemv_lut_split): the choice itself is
    # not an alternative
    return {k: v for k, v in alts.items() if k != choice_name and f"{k}_avx2" != choice_name}


def bench_kernels(shapes, configs, batches, rounds: int = 3, calls: int = 20, with_aqlm_package: bool = True,
                  alternatives: bool = True, log=print, threads: int | None = None, bf16: bool = False,
                  aqlm_package_threads: int = 1) -> list[dict]:
    """`threads`: torch's thread count (default: all cores; TVM's pool is sized by TVM_NUM_THREADS before it
    starts). `bf16`: also time torch's bf16 matmul (oneDNN on CPUs with AVX-512 BF16: the fastest dense path)."""
    import torch
    import tvm

    from aqlm_compile.kernels.gemv_direct import GemvShape
    from aqlm_compile.kernels.gemv_lut import GROUP_MAJOR, OUT_MAJOR, to_group_major
    from aqlm_compile.kernels.gemv_lut_vbmi import ROW_TILED, to_row_tiled
    from aqlm_compile.kernels.registry import codes_layout, select_kernel
    from aqlm_compile.targets.common import target_features
    from aqlm_compile.targets.x86 import build, x86_target

    torch.set_num_threads(threads or os.cpu_count() or 1)
    target = x86_target()
    features = target_features(target)
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
            cfg.check_shape(out_f, in_f)
            j = in_f // cfg.in_group_size
            codes = rng.integers(-(1 << (cfg.nbits_per_codebook - 1)), 1 << (cfg.nbits_per_codebook - 1),
                                 (out_f, j, cfg.num_codebooks)).astype(cfg.code_dtype_name)
            cb = (rng.standard_normal((cfg.num_codebooks, cfg.codebook_size, cfg.in_group_size)) * 0.1).astype(np.float16)
            scales = rng.random(out_f).astype(np.float32)
            bias = np.zeros(out_f, np.float32)
            for batch in batches:
                shape = GemvShape(out_f, in_f, cfg, batch)
                # the group-major layout is repacked once here, outside the timings, as a runtime does at load time
                # (and as the aqlm package's kernel below gets its own layout)
                # row-tiled codes where an artifact would store this layer so (its decode GEMV is the VBMI LUT
                # kernel): then its prefill GEMM reads them too
                tiled = codes_layout(shape, "llvm", (OUT_MAJOR, ROW_TILED), features) == ROW_TILED
                choice = select_kernel(shape, "llvm", code_layouts=(OUT_MAJOR, GROUP_MAJOR) + ((ROW_TILED,) if tiled
                                                                                          else ()), features=features)
                fn = build(choice.build_func(shape, "k"), target)["k"]
                x = rng.standard_normal((batch, in_f)).astype(np.float32)
                layouts = {OUT_MAJOR: codes, GROUP_MAJOR: to_group_major(codes)}
                if out_f % 64 == 0:
                    layouts[ROW_TILED] = to_row_tiled(codes)
                args = [tvm.runtime.tensor(a, dev) for a in (x, layouts[choice.code_layout], cb, scales, bias)]
                y = tvm.runtime.empty((batch, out_f), "float32", dev)
                xt = torch.from_numpy(x)
                dense_fn = lambda: torch.matmul(xt, dense.T)  # noqa: E731
                if bf16:
                    xt16, dense16 = xt.to(torch.bfloat16), dense.to(torch.bfloat16)
                    bf16_fn = lambda: torch.matmul(xt16, dense16.T)  # noqa: E731
                alt_fns = {name: build(b(shape, name="k"), target)["k"]
                           for name, (b, _) in (_alternatives(shape, choice.name, features).items() if alternatives else [])}
                alt_args = {name: [args[0], tvm.runtime.tensor(layouts[lay], dev), *args[2:]]
                            for name, (_, lay) in (_alternatives(shape, choice.name, features).items() if alternatives else [])}
                runs = {"aqlm": [], "dense": [], "aqlm_cold": [], "dense_cold": [], **{a: [] for a in alt_fns}}
                if bf16:
                    runs["dense_bf16"] = []
                for _ in range(rounds):
                    for _ in range(3):
                        fn(*args, y), dense_fn()
                    runs["aqlm"].append(_median_ms(lambda: fn(*args, y), calls))
                    runs["dense"].append(_median_ms(dense_fn, calls))
                    runs["aqlm_cold"].append(_median_ms(lambda: fn(*args, y), max(3, calls // 4), flush))
                    runs["dense_cold"].append(_median_ms(dense_fn, max(3, calls // 4), flush))
                    if bf16:
                        runs["dense_bf16"].append(_median_ms(bf16_fn, calls))
                    for name, afn in alt_fns.items():
                        afn(*alt_args[name], y)
                        runs[name].append(_median_ms(lambda: afn(*alt_args[name], y), calls))
                ms = {k: statistics.median(v) for k, v in runs.items()}
                ref_fn = (_aqlm_package_kernel(cfg, x, codes, cb, scales, aqlm_package_threads)
                          if with_aqlm_package else None)
                if ref_fn is not None:
                    fn(*args, y)
                    agree = np.abs(ref_fn().numpy() - y.numpy()).max() / max(np.abs(y.numpy()).max(), 1e-30)
                    for _ in range(2):
                        ref_fn()
                    ms["aqlm_package"] = statistics.median(_median_ms(ref_fn, calls) for _ in range(rounds))
                lb_ms = kernel_bytes(cfg, out_f, in_f) / (bw * 1e9) * 1e3
                rec = {"config": cfg_name, "out_features": out_f, "in_features": in_f, "batch": batch,
                       "target": f"llvm/{target.attrs['mcpu']}", "kernel": choice.name,
                       "code_layout": choice.code_layout, "ms": ms["aqlm"],
                       "ms_cold": ms["aqlm_cold"], "baseline": "torch dense fp32", "baseline_ms": ms["dense"],
                       "baseline_ms_cold": ms["dense_cold"], "speedup": ms["dense"] / ms["aqlm"],
                       "bandwidth_bound_ms": lb_ms, "measured_bandwidth_gbs": bw,
                       "cold_vs_bound": ms["aqlm_cold"] / lb_ms,
                       "alternatives_ms": {a: ms[a] for a in alt_fns}}
                if bf16:
                    rec.update({"bf16_ms": ms["dense_bf16"], "speedup_vs_bf16": ms["dense_bf16"] / ms["aqlm"]})
                if "aqlm_package" in ms:
                    rec.update({"aqlm_package_ms": ms["aqlm_package"], "aqlm_package_rel_diff": float(agree),
                                "aqlm_package_threads": aqlm_package_threads, "threads": threads or os.cpu_count(),
                                "speedup_vs_aqlm_package": ms["aqlm_package"] / ms["aqlm"]})
                extra = f"; aqlm pkg {ms['aqlm_package']:.3f} ms" if "aqlm_package" in ms else ""
                alt = "".join(f"; {a} {ms[a]:.3f} ms" for a in alt_fns)
                log(f"{cfg_name:>7} {out_f}x{in_f} b{batch} {choice.name}: {ms['aqlm']:.3f} ms (cold {ms['aqlm_cold']:.3f})"
                    f" vs dense {ms['dense']:.3f} ms -> {rec['speedup']:.2f}x; bound {lb_ms:.3f} ms{extra}{alt}")
                records.append(rec)
    return records


def markdown_table(records: list[dict]) -> str:
    """One row per record: times, same-run ratios, cold time against the memory-bandwidth bound."""
    head = ("| config | out×in | batch | kernel | ms (hot) | dense fp32 ms | × dense | aqlm pkg ms | × aqlm pkg | "
            "ms (cold) | dense cold ms | bound ms | cold ÷ bound | other kernels ms |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    rows = []
    for r in records:
        pkg = f"{r['aqlm_package_ms']:.3f} | {r['speedup_vs_aqlm_package']:.2f}" if "aqlm_package_ms" in r else "– | –"
        alts = ", ".join(f"{k} {v:.3f}" for k, v in r.get("alternatives_ms", {}).items()) or "–"
        rows.append(f"| {r['config']} | {r['out_features']}×{r['in_features']} | {r['batch']} | {r['kernel']} | "
                    f"{r['ms']:.3f} | {r['baseline_ms']:.3f} | **{r['speedup']:.2f}** | {pkg} | {r['ms_cold']:.3f} | "
                    f"{r['baseline_ms_cold']:.3f} | {r['bandwidth_bound_ms']:.3f} | {r['cold_vs_bound']:.1f} | {alts} |")
    return head + "\n".join(rows) + "\n"
