"""Does PV-tuning's code step (V) lower the loss? Short PV runs from one checkpoint, one per variant of its settings,
each reporting the fraction of code groups changed per step and the validation KL to the FP model before and after.

    .venv/bin/python benchmarks/pv_code_step.py CKPT --variant NAME "k=v k=v" [--variant ...] [--steps 10]
        [--windows 24] [--val 4] [--tag TAG]

Every variant runs `aqlm-compile quantize --from-checkpoint CKPT --preset pv --set pv_steps=STEPS --set
nsamples=WINDOWS --set val_size=VAL --set k=v ...` in a child process (same seed, so the same windows, and the same
first validation KL). A variant with `pv_lr=0` isolates V: only the codes change. A cheap probe — few windows, one
validation set of VAL windows — to choose settings before a full `benchmarks/pv_smollm2.py` run, not a PPL.
Writes benchmarks/results/<machine>/pv-code-step-<CKPT name>[-TAG].{json,md}.
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--variant", nargs=2, action="append", required=True, metavar=("NAME", "SETTINGS"),
                    help='a name and its space-separated NAME=VALUE settings of the pv preset ("" for none)')
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--windows", type=int, default=24, help="calibration windows (nsamples), validation included")
    ap.add_argument("--val", type=int, default=4, help="validation windows (val_size)")
    ap.add_argument("--tag")
    args = ap.parse_args()

    from aqlm_compile.bench.machine import machine_info, machine_slug
    from aqlm_compile.bench.proc import run_measured
    from aqlm_compile.bench.records import write_result

    start = time.time()
    ckpt = Path(args.checkpoint)
    exe = str(Path(sys.executable).parent / "aqlm-compile")
    rows = []
    work = Path(tempfile.mkdtemp(prefix="pv-code-step-", dir=ROOT / "runs" if (ROOT / "runs").is_dir() else None))
    try:
        for name, spec in args.variant:
            settings = spec.split()
            out = work / name
            command = [exe, "quantize", "-o", str(out), "--preset", "pv", "--from-checkpoint", str(ckpt), "--quiet",
                       "--set", f"pv_steps={args.steps}", "--set", f"nsamples={args.windows}",
                       "--set", f"val_size={args.val}", *[a for s in settings for a in ("--set", s)]]
            run = run_measured(command, log_path=str(work / f"{name}.log"))
            if run.returncode != 0:
                sys.exit(f"variant {name}: quantize failed (exit {run.returncode}): see {work / name}.log")
            pv = json.loads((out / "quantize_report.json").read_text())["pv_tuning"]
            rows.append({"name": name, "settings": settings, "code_change_per_step": pv["code_change_per_step"],
                         "val_kl_before": pv["val_kl"][0], "val_kl_after": pv["val_kl"][-1], "val_kl": pv["val_kl"],
                         "wall_s": round(run.wall_s, 1)})
            print(f"{name}: {100 * rows[-1]['code_change_per_step']:.4f}% of groups per step, validation KL "
                  f"{rows[-1]['val_kl_before']:.4f} -> {rows[-1]['val_kl_after']:.4f}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    machine = machine_info(measure_bandwidth=False)
    command = f"python benchmarks/pv_code_step.py {ckpt.name} --steps {args.steps} --windows {args.windows} " \
              f"--val {args.val}" + "".join(f' --variant {n} "{s}"' for n, s in args.variant) \
              + (f" --tag {args.tag}" if args.tag else "")
    result = {"what": "PV code step probe: code groups changed per step and validation KL before/after, per variant",
              "command": command, "checkpoint": ckpt.name, "steps": args.steps, "windows": args.windows,
              "val_windows": args.val, "rows": rows, "machine": machine, "wall_s": round(time.time() - start, 1)}
    md = [f"# PV code-step probe from {ckpt.name}: {args.steps} steps", "",
          f"{args.windows} calibration windows of the pv preset's length ({args.val} for validation); validation KL "
          f"to the FP model. Machine: {machine.get('cpu')}, {machine.get('cores')} cores.", "",
          "| variant | settings | code groups changed per step | val KL before | val KL after |",
          "|---|---|---|---|---|"]
    md += [f"| {r['name']} | {' '.join(r['settings']) or '(preset)'} | {100 * r['code_change_per_step']:.4f}% | "
           f"{r['val_kl_before']:.4f} | {r['val_kl_after']:.4f} |" for r in rows]
    md += ["", f"Command: `{command}`.", ""]
    name = f"pv-code-step-{ckpt.name}" + (f"-{args.tag}" if args.tag else "")
    write_result(ROOT / "benchmarks" / "results" / machine_slug(machine), name, result, "\n".join(md))


if __name__ == "__main__":
    main()
