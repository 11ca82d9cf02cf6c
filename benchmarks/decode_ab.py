"""A/B of whole-model decode steps in the TVM runtime (or ONNX Runtime): two or more artifacts of the same
checkpoint, interleaved in one process, same thread count — did a build change make a decode step faster?

    .venv/bin/python benchmarks/decode_ab.py ART_A ART_B[@ort] [...] --tag NAME [--past 64] [--rounds 8]
                                              [--steps 20] [--threads 2] [--isolate]

`ART@ort` times the artifact's ONNX decoder in ONNX Runtime with the op library (runtime/ort.py `OrtDecoder`,
ORT's own pool at one thread, the op library's TVM pool at --threads), on the same inputs: the TVM and ORT routes
of one artifact side by side.

Each round times `steps` decode calls (one token after `past` cached tokens, random KV cache, the same inputs for
every artifact) of each artifact in turn, alternating which goes first; the median step of a round is kept and the
median over rounds reported, with every round's figure (the spread shows the machine's noise). The logits of each
artifact are compared with the first one's (max |Δ| and the argmax), since a faster build must compute the same
thing. Writes benchmarks/results/<machine>/decode-ab-<tag>.{json,md}. Nothing else should run meanwhile.

`--isolate`: each artifact is loaded in its own worker process (started once; the parent still interleaves the
rounds), as a deployment runs one runtime. In one process the TVM route's thread pool and the op library's (a second
TVM runtime, for ART@ort) both exist and an ORT step measured ≈ 1 ms slower than alone (hand-run, stop 34).
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


def load_ort(artifact: Path, past: int, threads: int, seed: int = 0):
    """`load` for the artifact's ONNX decoder in ONNX Runtime (the same inputs as `load` draws for the TVM route);
    the call returns [logits] like the TVM VM's."""
    import numpy as np

    from aqlm_compile import artifact as art
    from aqlm_compile.runtime.ort import OrtDecoder

    d = OrtDecoder(artifact, kind="aqlm", threads=threads)
    rng = np.random.default_rng(seed)
    kv = [rng.standard_normal((1, d.num_kv_heads, past, d.head_dim)).astype(np.float32)
          for _ in range(2 * d.num_layers)]
    ids = np.array([[rng.integers(0, d.vocab_size)]], np.int64)
    feeds = dict(zip(d.input_names, [ids, np.ones((1, past + 1), np.int64), *kv]))

    class Logits:  # the VM's output[0] has .numpy()
        def __init__(self, a):
            self.a = a

        def numpy(self):
            return self.a

    return (lambda: [Logits(d.session.run(None, feeds)[0])]), art.read_manifest(Path(artifact))


def load(artifact: Path, past: int, seed: int = 0):
    """(the decode function bound to fixed inputs, the manifest's kernels) of an artifact's TVM route."""
    import numpy as np

    from aqlm_compile import artifact as art
    from aqlm_compile.runtime.tvm_runtime import TvmDecoder

    d = TvmDecoder(artifact)  # checks the artifact (sha256 of every file) before loading it
    rng = np.random.default_rng(seed)
    t = lambda a: d.tvm.runtime.tensor(a, d.dev)  # noqa: E731
    d.kv.fill([rng.standard_normal((1, d.num_kv_heads, past, d.head_dim)).astype(np.float32)
               for _ in range(2 * d.num_layers)])
    ids = t(np.array([[rng.integers(0, d.vocab_size)]], np.int64))
    mask = t(np.ones((1, past + 1), np.int64))
    fn = d.vm["decode"]
    # the same step each call: an in-place cache has its row P rewritten with the same keys (tvm_runtime.KvCache)
    call_args = [ids, mask, *d.kv.arguments(1), *d.params]
    if d.kv.form == "in_place":  # the result is the logits alone
        return (lambda: [fn(*call_args)]), art.read_manifest(Path(artifact))
    return (lambda: fn(*call_args)), art.read_manifest(Path(artifact))


MARK = "DECODE_AB "  # the worker's protocol lines on stdout (anything else a library prints is ignored)


def worker(spec: str, past: int, threads: int, steps: int, logits_path: str) -> None:
    """--isolate's child: load one artifact, save its logits, then time `steps` calls per "time" line on stdin."""
    import numpy as np

    # the protocol gets the real stdout; whatever a library prints goes to stderr
    proto = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    call, _ = (load_ort(Path(spec.removesuffix("@ort")), past, threads) if spec.endswith("@ort")
               else load(Path(spec), past))
    np.save(logits_path, np.asarray(call()[0].numpy(), np.float64))
    print(MARK + json.dumps({"ready": True}), file=proto, flush=True)
    for line in sys.stdin:
        if line.strip() != "time":
            break
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            call()
            times.append(time.perf_counter() - t0)
        print(MARK + json.dumps({"ms": statistics.median(times) * 1e3}), file=proto, flush=True)


class Worker:
    """The parent's handle on one --isolate child."""

    def __init__(self, spec: str, args, folder: Path, index: int):
        import subprocess

        self.spec = spec
        self.logits_path = str(folder / f"logits-{index}.npy")
        self.proc = subprocess.Popen(
            [sys.executable, __file__, spec, "--worker", spec, "--past", str(args.past), "--threads", str(args.threads),
             "--steps", str(args.steps), "--logits", self.logits_path, "--tag", "worker"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            env={**os.environ, "TVM_NUM_THREADS": str(args.threads)})
        self.read()

    def read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(MARK):
                return json.loads(line[len(MARK):])
        raise SystemExit(f"decode_ab: the worker of {self.spec} exited (code {self.proc.wait()})")

    def time(self) -> float:
        self.proc.stdin.write("time\n")
        self.proc.stdin.flush()
        return self.read()["ms"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("artifacts", nargs="+")
    ap.add_argument("--tag", required=True, help="names the result files: decode-ab-<tag>")
    ap.add_argument("--past", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", help="output folder (default benchmarks/results/<machine>)")
    ap.add_argument("--isolate", action="store_true", help="each artifact in its own worker process")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--logits", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        os.environ["TVM_NUM_THREADS"] = str(args.threads)
        worker(args.worker, args.past, args.threads, args.steps, args.logits)
        return
    if len(args.artifacts) < 2:
        sys.exit("decode_ab: give at least two artifacts")
    os.environ["TVM_NUM_THREADS"] = str(args.threads)  # before TVM's pool starts (docs/tvm-and-ort-notes.md N2)

    import numpy as np

    from aqlm_compile.bench.machine import machine_info, machine_slug
    from aqlm_compile.cache import atomic_write_bytes

    start = time.time()
    runtimes = ["ort" if a.endswith("@ort") else "tvm" for a in args.artifacts]
    arts = [Path(a.removesuffix("@ort")) for a in args.artifacts]
    if args.isolate:
        import tempfile

        from aqlm_compile import artifact as art

        folder = Path(tempfile.mkdtemp(prefix="decode-ab-"))
        workers = [Worker(spec, args, folder, i) for i, spec in enumerate(args.artifacts)]
        manifests = [art.read_manifest(a) for a in arts]
        logits = [np.load(w.logits_path) for w in workers]
        timers = [w.time for w in workers]
    else:
        calls, manifests = zip(*(load_ort(a, args.past, args.threads) if rt == "ort" else load(a, args.past)
                                 for a, rt in zip(arts, runtimes)))
        outs = [c() for c in calls]  # warm-up; the logits to compare
        logits = [np.asarray(o[0].numpy(), np.float64) for o in outs]

        def timer(call):
            def run():
                steps = []
                for _ in range(args.steps):
                    t0 = time.perf_counter()
                    call()
                    steps.append(time.perf_counter() - t0)
                return statistics.median(steps) * 1e3
            return run

        timers = [timer(c) for c in calls]
    arts = [a if rt == "tvm" else Path(f"{a}@ort") for a, rt in zip(arts, runtimes)]
    rounds = {str(a): [] for a in arts}
    for r in range(args.rounds):
        order = list(range(len(arts)))
        if r % 2:
            order.reverse()
        for i in order:
            time.sleep(0.2)
            rounds[str(arts[i])].append(timers[i]())
    if args.isolate:
        import shutil

        for w in workers:
            w.close()
        shutil.rmtree(folder, ignore_errors=True)
    machine = machine_info()
    rows = []
    for a, rt, lg, m in zip(arts, runtimes, logits, manifests):
        ms = rounds[str(a)]
        k = (m.get("tvm") or {}).get("kernels", {}) if rt == "tvm" else m.get("kernels", {})
        files = ("model_params.bin",) if rt == "tvm" else ("onnx/model.onnx", "onnx/model.onnx.data")
        params = sum(m["files"].get(f, {}).get("bytes", 0) for f in files) or None
        rows.append({"artifact": str(a), "runtime": rt, "median_ms": statistics.median(ms), "rounds_ms": ms,
                     "tokens_per_s": 1e3 / statistics.median(ms),
                     "max_abs_logit_diff_vs_first": float(np.abs(lg - logits[0]).max()),
                     "same_argmax_as_first": bool(lg.argmax() == logits[0].argmax()),
                     # the kernels a decode step calls: the VM's decode_*, or the op library's one-token ones
                     "kernels": sorted({v["kernel"] for s, v in k.items()
                                        if s.startswith("decode_") or (rt == "ort" and v.get("batch") in (1, "any")
                                                                       and "gemm" not in s)}),
                     # what the TVM route loads: the params file's bytes; how the head and embedding are stored
                     "params_bytes": params, "head": (m.get("tvm") or {}).get("head"),
                     "ort_head": ", ".join(f"{v['weight_dtype']} rows (DenseMatMul)" for v in k.values()
                                           if v.get("kernel") == "dense") if rt == "ort" else None,
                     "lm_head_config": m["layers"].get("lm_head", {}).get("config", m["aqlm_config"])
                     if "lm_head" in m["layers"] else None, "embedding": m.get("embedding", "stored")})
    record = {"what": "decode step (TVM runtime; ONNX Runtime for ART@ort), artifacts interleaved"
              + (", each in its own process" if args.isolate else ", one process"), "command": " ".join(sys.argv),
              "past": args.past, "rounds": args.rounds, "steps": args.steps, "threads": args.threads,
              "machine": machine, "wall_s": round(time.time() - start, 1), "rows": rows}
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / machine_slug(machine)
    base = out / f"decode-ab-{args.tag}"
    atomic_write_bytes(base.with_suffix(".json"), (json.dumps(record, indent=1) + "\n").encode())
    lines = [f"# Decode A/B: {args.tag}", "",
             f"{machine['cpu']}, {args.threads} threads; one decode step after {args.past} cached tokens; median of "
             f"{args.steps} steps per round, {args.rounds} rounds interleaved"
             f"{', each artifact in its own process' if args.isolate else ', one process'}. "
             f"Command: `{record['command']}`.", "",
             "| artifact | runtime | lm_head | embedding | weights file | median ms/step | tokens/s | rounds (ms) | "
             "max abs logit diff vs first | same argmax | decode kernels |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        head = f"AQLM {row['lm_head_config']}" if row["lm_head_config"] else (row["head"] or "dense")
        size = f"{row['params_bytes'] / 1e6:.1f} MB" if row["params_bytes"] else "n/a"
        if row["runtime"] == "ort" and not row["lm_head_config"]:  # dense head: the op library's kernel, or ORT's MatMul
            head = row["ort_head"] or "fp32 MatMul (ORT)"
        lines.append(f"| {Path(row['artifact']).name} | {row['runtime']} | {head} | {row['embedding']} | {size} | "
                     f"{row['median_ms']:.2f} | {row['tokens_per_s']:.1f} | "
                     f"{', '.join(f'{x:.1f}' for x in row['rounds_ms'])} | {row['max_abs_logit_diff_vs_first']:.2e} | "
                     f"{row['same_argmax_as_first']} | {', '.join(row['kernels'])} |")
    atomic_write_bytes(base.with_suffix(".md"), ("\n".join(lines) + "\n").encode())
    print("\n".join(lines))


if __name__ == "__main__":
    main()
