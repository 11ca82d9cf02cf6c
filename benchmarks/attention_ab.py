"""The prompt attention kernel (kernels/attention.py `causal_attention`) of this checkout against an earlier commit's,
interleaved in one process on the same inputs: SmolLM2's heads (9 query, 3 K/V, 64 dims) by default, causal mask,
one call per prompt length.

    python benchmarks/attention_ab.py BASE --lengths 128,512 --rounds 24 --tag NAME [--kwargs dim_chunk=16]
        [--base-kwargs dim_chunk=16]

BASE's kernels/attention.py is read with `git show` and imported beside this checkout's; `--kwargs` are passed to
this checkout's builder only (e.g. the schedule the build picks for this CPU), `--base-kwargs` to BASE's (the
schedule BASE's build picked). Writes
benchmarks/results/<machine>/attention-ab-<tag>.{json,md}.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("base")
    ap.add_argument("--lengths", default="128,512")
    ap.add_argument("--heads", default="9,3,64", help="query heads, K/V heads, head dim")
    ap.add_argument("--rounds", type=int, default=24)
    ap.add_argument("--calls", type=int, default=5, help="calls per round (the fastest counts)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kwargs", default="", help="NAME=INT,... for this checkout's causal_attention")
    ap.add_argument("--base-kwargs", default="", help="NAME=INT,... for BASE's causal_attention")
    ap.add_argument("--tag", required=True)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)  # before TVM's pool starts (docs/tvm-and-ort-notes.md N2)

    import numpy as np
    import tvm

    from aqlm_compile.bench.machine import machine_info, machine_slug
    from aqlm_compile.cache import atomic_write_bytes
    from aqlm_compile.kernels import attention as head_mod
    from aqlm_compile.targets.x86 import build, x86_target

    try:
        lengths = [int(v) for v in args.lengths.split(",")]
        H, G, D = (int(v) for v in args.heads.split(","))
        kwargs, base_kwargs = ({k: int(v) for k, v in (kv.split("=") for kv in text.split(",") if kv)}
                               for text in (args.kwargs, args.base_kwargs))
    except ValueError:
        sys.exit("attention_ab: --lengths N,..., --heads H,G,D, --kwargs and --base-kwargs NAME=INT,... take integers")
    src = subprocess.run(["git", "show", f"{args.base}:kernels/attention.py"], cwd=ROOT, capture_output=True, text=True)
    if src.returncode != 0:
        sys.exit(f"attention_ab: cannot read kernels/attention.py at {args.base}: {src.stderr.strip()}")
    start = time.time()
    machine = machine_info()
    scale = D ** -0.5
    with tempfile.TemporaryDirectory() as tmp:  # TVMScript reads the kernel's source while building it
        path = Path(tmp) / "attention_base.py"
        path.write_text(src.stdout)
        spec = importlib.util.spec_from_file_location("aqlm_compile.kernels.attention_base", path)
        base_mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(base_mod)
        fs = {"base": build(base_mod.causal_attention(H, G, D, scale, name="a", **base_kwargs), x86_target())["a"],
              "head": build(head_mod.causal_attention(H, G, D, scale, name="a", **kwargs), x86_target())["a"]}
    rows = []
    for S in lengths:
        rng = np.random.default_rng(S)
        q = tvm.runtime.tensor(rng.standard_normal((1, H, S, D)).astype(np.float32))
        k, v = (tvm.runtime.tensor(rng.standard_normal((1, G, S, D)).astype(np.float32)) for _ in range(2))
        mask = tvm.runtime.tensor(np.tril(np.ones((S, S), bool))[None, None])
        outs = {n: tvm.runtime.empty((1, H, S, D), "float32", tvm.cpu()) for n in fs}
        times = {n: [] for n in fs}
        for r in range(args.rounds):
            for n in (["base", "head"] if r % 2 == 0 else ["head", "base"]):
                best = float("inf")
                for _ in range(args.calls):
                    t0 = time.perf_counter()
                    fs[n](q, k, v, mask, outs[n])
                    best = min(best, time.perf_counter() - t0)
                times[n].append(best * 1e3)
        b, h = statistics.median(times["base"]), statistics.median(times["head"])
        rows.append({"length": S, "base_ms": b, "head_ms": h, "head_over_base": h / b,
                     "base_rounds_ms": times["base"], "head_rounds_ms": times["head"],
                     "max_abs_diff": float(np.abs(outs["head"].numpy() - outs["base"].numpy()).max())})
    record = {"what": f"causal_attention {H}x{G}x{D}, one prompt of each length, base {args.base} "
              f"({base_kwargs or 'defaults'}) vs this checkout ({kwargs or 'defaults'})", "command": " ".join(sys.argv), "threads": args.threads,
              "rounds": args.rounds, "machine": machine, "wall_s": round(time.time() - start, 1), "rows": rows}
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / machine_slug(machine)
    base = out / f"attention-ab-{args.tag}"
    atomic_write_bytes(base.with_suffix(".json"), (json.dumps(record, indent=1) + "\n").encode())
    lines = [f"# Prompt attention A/B: {args.tag}", "",
             f"{machine['cpu']}, {args.threads} threads; {record['what']}; fastest of {args.calls} calls per round, "
             f"median over {args.rounds} rounds (order alternating). Command: `{record['command']}`.", "",
             "| prompt tokens | base ms | this checkout ms | ratio | max abs diff |", "|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['length']} | {row['base_ms']:.3f} | {row['head_ms']:.3f} | {row['head_over_base']:.3f} | "
                     f"{row['max_abs_diff']:.1e} |")
    atomic_write_bytes(base.with_suffix(".md"), ("\n".join(lines) + "\n").encode())
    print("\n".join(lines))


if __name__ == "__main__":
    main()
