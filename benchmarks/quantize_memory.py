"""Peak memory of `quantize` against the number of calibration windows (issue 16): with `--offload disk` it must
not grow with the window count.

Quantizes the first block of a random model with Llama-2-7B block shapes (`bench/synthetic.py`: 4096 hidden,
11008 FFN, SmolLM2's 49152-token vocabulary, one block) at each window count (`--windows 64 256` of `--seqlen
2048` tokens by default), each in its own child whose peak RSS (VmHWM) is polled from /proc, then writes
`benchmarks/results/<machine>/quantize-memory-<tag>.{json,md}`. Memory, not quality, is measured: AQ runs one round
with a short k-means, and block fine-tuning runs `--finetune-epochs` epochs of at most `--finetune-steps` batches
(its working set is one batch whatever the window count; the validation pass still reads its windows). The in-memory run is only attempted where its buffers fit (`--with-memory`).

    python benchmarks/quantize_memory.py --tag llama2-7b-shapes --work DIR  # 64 and 256 × 2048 (≈ 3 h here)

With `--work DIR`, each finished row is kept there (`row-<windows>-<offload>.json`, with its command) and a re-run
with the same folder measures only the rows still missing: a run cut short resumes.
    python benchmarks/quantize_memory.py --tag smoke --shapes tiny --windows 8 32 --seqlen 128
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY_SHAPES = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                   rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=4096)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tag", required=True)
    ap.add_argument("--windows", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--shapes", choices=["llama2-7b", "tiny"], default="llama2-7b")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--finetune-epochs", type=int, default=1,
                    help="block fine-tuning epochs (0 halves the run; its working set is one batch either way)")
    ap.add_argument("--finetune-steps", type=int, default=4,
                    help="optimizer steps per fine-tuning epoch at most (finetune_max_steps; 0: every batch)")
    ap.add_argument("--with-memory", action="store_true", help="also run --offload none at each window count")
    ap.add_argument("--work", help="folder for the model and the runs (default: a temporary one)")
    args = ap.parse_args()

    from aqlm_compile.bench.machine import machine_info, machine_slug
    from aqlm_compile.bench.proc import child_env, run_measured
    from aqlm_compile.bench.records import write_result
    from aqlm_compile.bench.synthetic import LLAMA2_7B, make_fp_model
    from aqlm_compile.models import default_model_dir

    start = time.time()
    shapes = LLAMA2_7B if args.shapes == "llama2-7b" else TINY_SHAPES
    work_ctx = tempfile.TemporaryDirectory(prefix="quantize-memory-") if not args.work else None
    work = Path(args.work or work_ctx.name)
    fp = make_fp_model(work / f"fp-{args.shapes}-1block", 1, default_model_dir(), shapes=shapes)
    hidden, ffn = shapes["hidden_size"], shapes["intermediate_size"]
    rows = []
    modes = ["disk"] + (["none"] if args.with_memory else [])
    for n in args.windows:
        for mode in modes:
            out = work / f"q-{n}-{mode}"
            done = work / f"row-{n}-{mode}.json"  # a finished row: a re-run with the same --work reuses it
            cmd = [sys.executable, "-m", "aqlm_compile", "quantize", str(fp), "-o", str(out), "--preset", "fast",
                   "--num-blocks", "1", "--nsamples", str(n), "--seqlen", str(args.seqlen), "--offload", mode,
                   "--device", "cpu", "--quiet", "--set", "max_rounds=1", "--set", "kmeans_iters=4",
                   "--set", f"finetune_epochs={args.finetune_epochs}",
                   "--set", f"finetune_max_steps={args.finetune_steps or 'none'}", "--set", f"val_size={min(8, n // 4)}",
                   # the block stage is what is measured: not the fast preset's end-to-end epoch over the whole model
                   "--set", "global_epochs=0"]
            if done.is_file():
                saved = json.loads(done.read_text())
                if saved.get("command") == cmd[1:]:
                    print(f"{n} windows, offload {mode}: measured before ({done})", flush=True)
                    rows.append(saved["row"])
                    continue
            print(f"{n} windows, offload {mode} ...", flush=True)
            res = run_measured(cmd, env=child_env(args.threads), log_path=work / f"q-{n}-{mode}.log")
            buffer = n * args.seqlen * hidden * 4
            row = {"windows": n, "seqlen": args.seqlen, "offload": mode, "exit_status": res.returncode,
                   "wall_s": round(res.wall_s, 1), "peak_rss_bytes": res.peak_rss_bytes,
                   "activation_buffer_bytes": buffer}
            if res.returncode == 0:
                report = json.loads((out / "quantize_report.json").read_text())
                row["phases_s"] = report["timings"]
            else:
                row["error"] = (work / f"q-{n}-{mode}.log").read_text()[-400:]
            rows.append(row)
            if res.returncode == 0:
                from aqlm_compile.cache import atomic_write_bytes

                atomic_write_bytes(done, json.dumps({"command": cmd[1:], "row": row}).encode())
                shutil.rmtree(out, ignore_errors=True)  # the checkpoint is not what is measured
    rows.sort(key=lambda r: (r["windows"], r["offload"]))  # --windows may list the long row first
    machine = machine_info(measure_bandwidth=False)
    disk = [r for r in rows if r["offload"] == "disk" and r["exit_status"] == 0]
    growth = (max(r["peak_rss_bytes"] for r in disk) / min(r["peak_rss_bytes"] for r in disk) - 1) if len(disk) > 1 \
        else None
    result = {"what": "peak RSS of quantize (first block of a random model) against the calibration window count",
              "command": "python benchmarks/quantize_memory.py " + " ".join(sys.argv[1:]),
              "shapes": {"name": args.shapes, "hidden_size": hidden, "intermediate_size": ffn},
              "threads": args.threads, "rows": rows, "disk_peak_growth": growth, "machine": machine,
              "wall_s": round(time.time() - start, 1)}
    md = [f"# Quantize memory against calibration windows: {args.tag}", "",
          f"First block of a random model ({args.shapes} shapes: {hidden} hidden, {ffn} FFN), `quantize --preset "
          f"fast --num-blocks 1` with one AQ round, 4 k-means iterations and {args.finetune_epochs} fine-tuning epoch(s) of at most "
          f"{args.finetune_steps or 'all'} steps, "
          f"{args.threads} threads. Machine: {machine.get('cpu')}, {machine.get('cores')} cores, "
          f"{machine.get('memory_bytes', 0) / 2**30:.0f} GiB.", "",
          "| windows × tokens | offload | one activation buffer | peak RSS | wall | exit |", "|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['windows']} × {r['seqlen']} | {r['offload']} | {r['activation_buffer_bytes'] / 2**30:.2f} GiB | "
                  f"{r['peak_rss_bytes'] / 2**30:.2f} GiB | {r['wall_s'] / 60:.1f} min | {r['exit_status']} |")
    if growth is not None:
        md += ["", f"Peak RSS with `--offload disk`, highest over lowest: **{growth * 100:+.1f}%**."]
    md += ["", f"Command: `{result['command']}`.", ""]
    write_result(ROOT / "benchmarks" / "results" / machine_slug(machine), f"quantize-memory-{args.tag}", result,
                 "\n".join(md))
    if work_ctx is not None:
        work_ctx.cleanup()


if __name__ == "__main__":
    main()
