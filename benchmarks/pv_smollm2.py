"""PV-tuning from an existing SmolLM2 checkpoint: held-out Brown PPL before and after
`aqlm-compile quantize --preset pv --from-checkpoint CKPT --pv-steps N`, with the wall time and peak RSS of the
PV run (a child process, `bench.proc.run_measured`), the validation KL per epoch and the code change per step.
Scoreboard windows (Brown ck*–cr*, 32 × 512 tokens, BOS-prefixed).

    .venv/bin/python benchmarks/pv_smollm2.py CKPT [--steps 300] [--embedding stored|int8|int4|head]
        [--head fp16|int8] [--set NAME=VALUE ...] [--tag TAG] [--out DIR]

--set overrides a setting of the pv preset (as `quantize --set`), e.g. pv_code_beta1=0.9 or pv_max_code_change=0
(P only: the same steps without code updates). The tuned checkpoint goes to --out (default:
runs/<CKPT name>-pv<steps>[-TAG]). Writes benchmarks/results/<machine>/pv-<CKPT name>-<steps>[-TAG].{json,md}.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--embedding", default="stored", help="the embedding form to evaluate with (eval --embedding)")
    ap.add_argument("--head", default="fp16", choices=["fp16", "int8"],
                    help="a dense lm_head as `build --head` stores it (eval --head)")
    ap.add_argument("--set", dest="assignments", action="append", default=[], metavar="NAME=VALUE",
                    help="a pv preset setting (quantize --set); repeatable")
    ap.add_argument("--tag", help="a suffix naming this variant in the output and result file names")
    ap.add_argument("--out")
    args = ap.parse_args()

    from aqlm_compile.bench.machine import machine_info, machine_slug
    from aqlm_compile.bench.proc import run_measured
    from aqlm_compile.bench.records import write_result
    from aqlm_compile.jobs import eval_job
    from aqlm_compile.progress import Reporter

    start = time.time()
    ckpt = Path(args.checkpoint)
    suffix = f"-{args.tag}" if args.tag else ""
    out = Path(args.out) if args.out else ROOT / "runs" / f"{ckpt.name}-pv{args.steps}{suffix}"
    reporter = Reporter()
    before = eval_job(str(ckpt), rtn=False, reporter=reporter, embedding=args.embedding, head=args.head)
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = [str(Path(sys.executable).parent / "aqlm-compile"), "quantize", "-o", str(out), "--preset", "pv",
               "--from-checkpoint", str(ckpt), "--pv-steps", str(args.steps), "--quiet",
               *[arg for a in args.assignments for arg in ("--set", a)]]
    run = run_measured(command, log_path=f"{out}.log")
    if run.returncode != 0:
        sys.exit(f"quantize failed (exit {run.returncode}): see {out}.log")
    report = json.loads((out / "quantize_report.json").read_text())
    after = eval_job(str(out), rtn=False, fp=False, reporter=reporter, embedding=args.embedding,
                     head=args.head)
    pv = report["pv_tuning"]
    machine = machine_info(measure_bandwidth=False)
    result = {"what": "held-out Brown PPL before and after PV-tuning (quantize --preset pv --from-checkpoint)",
              "command": f"python benchmarks/pv_smollm2.py {ckpt.name} --steps {args.steps} --embedding {args.embedding}"
                          + (f" --head {args.head}" if args.head != "fp16" else "")
                          + "".join(f" --set {a}" for a in args.assignments) + (f" --tag {args.tag}" if args.tag else ""),
              "checkpoint": ckpt.name, "config": before["config"], "embedding": args.embedding, "head": args.head,
              "windows": before["windows"], "seqlen": before["seqlen"], "fp_ppl": before["fp_ppl"],
              "ppl_before": before["ppl"], "ppl_after": after["ppl"], "file_bytes": after["file_bytes"],
              "pv_steps": pv["steps"], "pv_seconds": report["timings"]["pv"], "pv_wall_s": round(run.wall_s, 1),
              "pv_peak_rss_bytes": run.peak_rss_bytes, "val_kl": pv["val_kl"],
              "code_change_per_step": pv["code_change_per_step"],
              "settings": json.loads((out / "config.json").read_text())["aqlm_compile"]["method"]["settings"],
              "machine": machine, "wall_s": round(time.time() - start, 1)}
    fp = before["fp_ppl"]
    md = [f"# PV-tuning {ckpt.name} ({before['config']}), {pv['steps']} steps", "",
          f"Held-out Brown, {before['windows']} × {before['seqlen']} tokens, embedding `{args.embedding}`, "
          f"head `{args.head}`. "
          f"Machine: {machine.get('cpu')}, {machine.get('cores')} cores.", "",
          "| | PPL | × FP |", "|---|---|---|",
          f"| FP | {fp:.2f} | 1.00 |",
          f"| {ckpt.name} | {before['ppl']:.2f} | {before['ppl'] / fp:.2f} |",
          f"| + PV, {pv['steps']} steps | {after['ppl']:.2f} | {after['ppl'] / fp:.2f} |", "",
          f"PV run: {run.wall_s / 60:.1f} min wall ({report['timings']['pv'] / 60:.1f} min in PV steps), peak RSS "
          f"{run.peak_rss_bytes / 2**30:.1f} GiB; mean code groups changed per step "
          f"{100 * pv['code_change_per_step']:.3f}%; validation KL per epoch: "
          + ", ".join("–" if v is None else f"{v:.4f}" for v in pv["val_kl"]) + ".", "",
          f"Command: `{result['command']}`.", ""]
    name = f"pv-{ckpt.name}-{args.steps}" + (f"-head-{args.head}" if args.head != "fp16" else "") + suffix
    write_result(ROOT / "benchmarks" / "results" / machine_slug(machine), name, result,
                 "\n".join(md))


if __name__ == "__main__":
    main()
