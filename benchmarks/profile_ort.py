"""Where the time of one decode step, or of one prompt, goes in ONNX Runtime (the artifact's ONNX decoder with the
op library): ORT's own profiler, per node, summed by op type and listed for the slowest nodes.

    .venv/bin/python benchmarks/profile_ort.py ARTIFACT [--past 64 | --prompt 128] [--calls 20] [--threads 2]

The uninstrumented call is timed first (the median of --calls calls), then the same calls with the profiler on.
Writes benchmarks/results/<machine>/ort-profile-<artifact>-decode-<past>.{json,md}, or with `--prompt N` (each call
a prefill of N random tokens into an empty cache) ort-profile-<artifact>-prefill-<N>.{json,md}.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("artifact")
    ap.add_argument("--past", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=0, help="profile a prefill of this many tokens instead of a step")
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--out", help="output folder (default benchmarks/results/<machine>)")
    args = ap.parse_args()

    import numpy as np

    from aqlm_compile.bench.machine import machine_info, machine_slug
    from aqlm_compile.cache import atomic_write_bytes
    from aqlm_compile.runtime.ort import OrtDecoder

    start = time.time()
    art = Path(args.artifact)

    # The decoder's own in-place path (OrtDecoder.step: past and present bound to one buffer, only the new row
    # appended), as generation runs it: a prompt of `past` random tokens, then each timed step starts from the same
    # `past` rows (the length is set back; rows beyond it are never read). A session.run with fresh past arrays
    # would copy the whole cache into a new present on every step, which the decoder never does.
    def prepare(d):
        if not d.in_place:
            sys.exit(f"{art}: its ONNX decoder keeps no in-place KV cache (no GroupQueryAttention): not profiled")
        rng = np.random.default_rng(0)
        d.reset()
        if args.prompt:
            prompt = rng.integers(0, d.vocab_size, args.prompt).astype(np.int64)
            d.step(prompt)

            def prefill():
                d.length = 0  # an empty cache again: the rows left behind are never read
                d.step(prompt)
            return prefill
        d.step(rng.integers(0, d.vocab_size, args.past))
        token = np.array([int(rng.integers(0, d.vocab_size))], np.int64)

        def step():
            d.length = args.past
            d.step(token)
        return step

    plain = OrtDecoder(art, kind="aqlm", threads=args.threads)
    step = prepare(plain)
    step()
    steps = []
    for _ in range(args.calls):
        t0 = time.perf_counter()
        step()
        steps.append(time.perf_counter() - t0)
    uninstrumented = statistics.median(steps) * 1e3
    del plain

    with tempfile.TemporaryDirectory() as tmp:
        prof = OrtDecoder(art, kind="aqlm", threads=args.threads, profile_prefix=str(Path(tmp) / "ort"))
        step = prepare(prof)  # the prompt's run and a warm-up step: their events are dropped below
        step()
        for _ in range(args.calls):
            step()
        events = json.loads(Path(prof.session.end_profiling()).read_text())
    runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                  key=lambda e: e["ts"])
    first = runs[2]["ts"] if len(runs) > 2 else 0  # after the prompt and the warm-up step
    nodes = [e for e in events if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")
             and e["ts"] >= first]
    by_type, by_node = collections.defaultdict(float), collections.defaultdict(float)
    count = collections.Counter()
    for e in nodes:
        op = e.get("args", {}).get("op_name", "?")
        by_type[op] += e["dur"] / 1e3 / args.calls
        count[op] += 1
        by_node[(e["name"].removesuffix("_kernel_time"), op)] += e["dur"] / 1e3 / args.calls
    run_ms = statistics.median(r["dur"] / 1e3 for r in runs[2:]) if len(runs) > 2 else None
    machine = machine_info()
    what = f"prefill of {args.prompt} tokens" if args.prompt else "decode step"
    record = {"what": f"ONNX Runtime {what}, per node (ORT profiler)", "command": " ".join(sys.argv),
              "artifact": art.name, "past": 0 if args.prompt else args.past, "prompt": args.prompt,
              "threads": args.threads, "calls": args.calls,
              "machine": machine, "uninstrumented_ms": uninstrumented, "profiled_run_ms": run_ms,
              "nodes_sum_ms": sum(by_type.values()),
              "by_op_type": [{"op_type": k, "ms": v, "nodes_per_step": count[k] // args.calls}
                             for k, v in sorted(by_type.items(), key=lambda kv: -kv[1])],
              "slowest_nodes": [{"node": n, "op_type": op, "ms": v} for (n, op), v in
                                sorted(by_node.items(), key=lambda kv: -kv[1])[:args.top]],
              "wall_s": round(time.time() - start, 1)}
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / machine_slug(machine)
    base = out / (f"ort-profile-{art.name}-prefill-{args.prompt}" if args.prompt
                  else f"ort-profile-{art.name}-decode-{args.past}")
    atomic_write_bytes(base.with_suffix(".json"), (json.dumps(record, indent=1) + "\n").encode())
    call = (f"one prefill of {args.prompt} random tokens into an empty cache" if args.prompt else
            f"one decode step after {args.past} cached tokens")
    lines = [f"# ORT {what} profile: {art.name}", "",
             f"{machine['cpu']}, {args.threads} threads (the op library's TVM pool; ORT's own pool 1 thread); "
             f"{call}, the KV cache written in place as the decoder does; "
             f"{args.calls} calls. Command: `{record['command']}`.", "",
             f"Uninstrumented call (OrtDecoder.step, its Python included): {uninstrumented:.2f} ms (median). Profiled run: "
             f"{run_ms:.2f} ms; sum of node times {record['nodes_sum_ms']:.2f} ms (the rest: ORT's own work "
             "between nodes).", "", "| op type | ms per call | nodes per call |", "|---|---|---|"]
    lines += [f"| {r['op_type']} | {r['ms']:.3f} | {r['nodes_per_step']} |" for r in record["by_op_type"]]
    lines += ["", "| slowest nodes | op type | ms per call |", "|---|---|---|"]
    lines += [f"| {r['node']} | {r['op_type']} | {r['ms']:.3f} |" for r in record["slowest_nodes"]]
    atomic_write_bytes(base.with_suffix(".md"), ("\n".join(lines) + "\n").encode())
    print("\n".join(lines))


if __name__ == "__main__":
    main()
