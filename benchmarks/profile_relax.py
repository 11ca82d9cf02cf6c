"""Where the time of one whole-model call goes in the TVM runtime: every PrimFunc and VM builtin the Relax VM calls,
timed through the VM's instrument hook, for a prefill of N tokens or a decode step after P cached tokens.

    .venv/bin/python benchmarks/profile_relax.py ARTIFACT --function prefill --tokens 512
    .venv/bin/python benchmarks/profile_relax.py ARTIFACT --function decode --past 64

The uninstrumented time of the same call is measured first (the hook's own cost inflates the per-call sum, most for
the many small builtins). Writes benchmarks/results/<machine>/profile-<artifact>-<function>-<n>.{json,md}.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("artifact")
    ap.add_argument("--function", choices=("prefill", "decode"), default="prefill")
    ap.add_argument("--tokens", type=int, default=512, help="prefill: prompt tokens")
    ap.add_argument("--past", type=int, default=64, help="decode: cached tokens")
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--out", help="output folder (default benchmarks/results/<machine>)")
    args = ap.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)  # before TVM starts its pool

    import numpy as np
    import tvm
    from tvm import relax

    from aqlm_compile import artifact
    from aqlm_compile.runtime.tvm_runtime import KvCache
    from aqlm_compile.bench.machine import machine_info, machine_slug
    from aqlm_compile.cache import atomic_write_bytes

    art = Path(args.artifact)
    manifest = artifact.verify(art)
    info = manifest.get("tvm")
    if not info:
        sys.exit(f"{art}: no whole-model TVM route in the manifest")
    spec = info["decoder"]
    dev = tvm.cpu()
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(art / info["library"])), dev)
    loaded = tvm.runtime.load_param_dict_from_file(str(art / info["params"]))
    params = [loaded[k] for k in sorted(loaded)]
    rng = np.random.default_rng(0)
    t = lambda a: tvm.runtime.tensor(a, dev)  # noqa: E731
    n, past = (args.tokens, 0) if args.function == "prefill" else (1, args.past)
    kv = KvCache(tvm, dev, spec["num_layers"], spec["num_kv_heads"], spec["head_dim"], info.get("kv_cache", "concat"))
    kv.fill([rng.standard_normal((1, spec["num_kv_heads"], past, spec["head_dim"])).astype(np.float32)
             for _ in range(2 * spec["num_layers"])])
    call = [t(rng.integers(0, spec["vocab_size"], (1, n)).astype(np.int64)), t(np.ones((1, past + n), np.int64)),
            *kv.arguments(n), *params]
    fn = vm[args.function]
    fn(*call)  # warm-up
    start = time.perf_counter()
    for _ in range(args.calls):
        fn(*call)
    plain_ms = (time.perf_counter() - start) / args.calls * 1000

    times, counts, open_calls = collections.defaultdict(float), collections.Counter(), {}

    def instrument(func, name, before, ret, *rest):
        now = time.perf_counter()
        if before:
            open_calls[name] = now
        else:
            times[name] += now - open_calls.pop(name, now)
            counts[name] += 1
        return 0

    vm.set_instrument(instrument)
    for _ in range(args.calls):
        fn(*call)
    rows = [{"name": name, "ms_per_call": round(s / args.calls * 1000, 3), "count_per_call": counts[name] // args.calls}
            for name, s in sorted(times.items(), key=lambda kv: -kv[1])]
    summed = sum(r["ms_per_call"] for r in rows)
    kernels = sum(r["ms_per_call"] for r in rows if not r["name"].startswith("vm."))
    machine = machine_info(measure_bandwidth=False)
    what = f"{args.function} of {n} token(s)" + (f" after {past} cached" if past else "")
    result = {"what": f"time per PrimFunc / VM builtin of one {what}, Relax VM instrument hook",
              "command": "python benchmarks/profile_relax.py " + " ".join(sys.argv[1:]), "artifact": art.name,
              "function": args.function, "tokens": n, "past": past, "threads": args.threads, "calls": args.calls,
              "machine": machine, "uninstrumented_ms": round(plain_ms, 3), "instrumented_sum_ms": round(summed, 3),
              "primfuncs_ms": round(kernels, 3), "builtins_ms": round(summed - kernels, 3), "rows": rows}
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / machine_slug(machine)
    name = f"profile-{art.name}-{args.function}-{n if args.function == 'prefill' else past}"
    atomic_write_bytes(out / f"{name}.json", (json.dumps(result, indent=1) + "\n").encode())
    lines = [f"# {art.name}: {what}", "",
             f"{machine['cpu']}, {args.threads} threads, {args.calls} calls. Uninstrumented: **{plain_ms:.1f} ms**; "
             f"instrumented sum {summed:.1f} ms = PrimFuncs {kernels:.1f} ms + VM builtins {summed - kernels:.1f} ms "
             f"(the hook's own cost inflates the builtins most). Command: `{result['command']}`.", "",
             "| PrimFunc / builtin | ms per call | calls |", "|---|---|---|"]
    lines += [f"| {r['name']} | {r['ms_per_call']:.3f} | {r['count_per_call']} |" for r in rows[:args.top]]
    atomic_write_bytes(out / f"{name}.md", ("\n".join(lines) + "\n").encode())
    print("\n".join(lines))


if __name__ == "__main__":
    main()
