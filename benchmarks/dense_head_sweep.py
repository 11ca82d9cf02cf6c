"""The dense lm_head kernel (kernels/dense.py) under different schedules, on this CPU: rows per task, software
prefetch distance and locality; the weights rotate over copies larger than the L3, as a decode step reads them
(once per token, from DRAM). Interleaved rounds, median over rounds of each round's median call.

    python benchmarks/dense_head_sweep.py --variants 4/49152/2,1/49152/2 --dtype int8 --rounds 16 --tag NAME

A variant is ROWS/PREFETCH_BYTES/LOCALITY. Writes benchmarks/results/<machine>/dense-head-<tag>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", required=True, help="ROWS/PREFETCH_BYTES/LOCALITY, comma-separated")
    ap.add_argument("--dtype", default="int8", choices=("int8", "float16", "float32"))
    ap.add_argument("--shape", default="49152x576", help="OUTxIN (default SmolLM2's head)")
    ap.add_argument("--rounds", type=int, default=16)
    ap.add_argument("--calls", type=int, default=30, help="calls per round and variant")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tag", required=True)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)  # before TVM's pool starts (docs/tvm-and-ort-notes.md N2)

    import numpy as np
    import tvm

    from aqlm_compile.bench.machine import machine_info, machine_slug
    from aqlm_compile.cache import atomic_write_bytes
    from aqlm_compile.kernels.dense import dense_linear
    from aqlm_compile.targets.x86 import build, x86_target

    try:
        variants = [tuple(int(v) for v in spec.split("/")) for spec in args.variants.split(",")]
        out_f, in_f = (int(v) for v in args.shape.split("x"))
        if any(len(v) != 3 for v in variants):
            raise ValueError
    except ValueError:
        sys.exit("dense_head_sweep: --variants: expected ROWS/PREFETCH_BYTES/LOCALITY,... and --shape OUTxIN")
    start = time.time()
    machine = machine_info()
    wbytes = {"int8": 1, "float16": 2, "float32": 4}[args.dtype]
    l3 = 32 << 20
    n_copies = max(2, -(-2 * l3 // (out_f * in_f * wbytes)) + 1)  # the copies together exceed twice the L3
    rng = np.random.default_rng(0)
    copies = [tvm.runtime.tensor(rng.integers(-127, 128, (out_f, in_f), dtype=np.int8).astype(args.dtype))
              for _ in range(n_copies)]
    scales = tvm.runtime.tensor(np.full(out_f, 0.01, np.float32))
    x = tvm.runtime.tensor(rng.standard_normal((1, in_f)).astype(np.float32))
    ys = [tvm.runtime.empty((1, out_f), "float32", tvm.cpu()) for _ in variants]
    funcs = []
    for rows, dist, loc in variants:
        f = build(dense_linear(out_f, in_f, rows=rows, name="h", weight_dtype=args.dtype,
                               row_scales=args.dtype == "int8", prefetch_bytes=dist, prefetch_locality=loc),
                  x86_target())["h"]
        funcs.append(f)
    medians: list[list[float]] = [[] for _ in variants]
    for r in range(args.rounds):
        order = list(range(len(variants)))[::(-1 if r % 2 else 1)]
        for i in order:
            calls = []
            for k in range(args.calls):
                w = copies[k % n_copies]
                t0 = time.perf_counter()
                funcs[i](x, w, scales, ys[i]) if args.dtype == "int8" else funcs[i](x, w, ys[i])
                calls.append(time.perf_counter() - t0)
            medians[i].append(statistics.median(calls) * 1e3)
    ref = ys[0].numpy()
    rows = []
    for (nrows, dist, loc), ms, y in zip(variants, medians, ys):
        med = statistics.median(ms)
        rows.append({"rows": nrows, "prefetch_bytes": dist, "prefetch_locality": loc, "median_ms": med,
                     "rounds_ms": ms, "gb_per_s": out_f * in_f * wbytes / med / 1e6,
                     "max_abs_diff_vs_first": float(np.abs(y.numpy() - ref).max())})
    record = {"what": f"dense {args.dtype} head {out_f}x{in_f}, one token, weights rotating over {n_copies} copies",
              "command": " ".join(sys.argv), "threads": args.threads, "rounds": args.rounds, "calls": args.calls,
              "machine": machine, "wall_s": round(time.time() - start, 1), "rows": rows}
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / machine_slug(machine)
    base = out / f"dense-head-{args.tag}"
    atomic_write_bytes(base.with_suffix(".json"), (json.dumps(record, indent=1) + "\n").encode())
    lines = [f"# Dense head kernel sweep: {args.tag}", "",
             f"{machine['cpu']}, {args.threads} threads; {record['what']}; median of {args.calls} calls per round, "
             f"{args.rounds} rounds interleaved (order alternating). Command: `{record['command']}`.", "",
             "| rows per task | prefetch bytes ahead | locality | median ms | GB/s | rounds (ms) | max abs diff vs first |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['rows']} | {row['prefetch_bytes']} | {row['prefetch_locality']} | {row['median_ms']:.3f} | "
                     f"{row['gb_per_s']:.1f} | {', '.join(f'{v:.2f}' for v in row['rounds_ms'])} | "
                     f"{row['max_abs_diff_vs_first']:.1e} |")
    atomic_write_bytes(base.with_suffix(".md"), ("\n".join(lines) + "\n").encode())
    print("\n".join(lines))


if __name__ == "__main__":
    main()
