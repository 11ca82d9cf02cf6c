"""Fuzz what users load (issue 15): corrupted checkpoints, corrupted artifacts, malformed inputs to the ORT op
library (aqlm_compile/bench/fuzz.py). Every case must end in a clean one-line error or be accepted; the totals
(cases tried, accepted, clean errors, unclean errors, crashes, hangs) are printed and recorded.

    .venv/bin/python benchmarks/fuzz.py                 # the full run: 300 checkpoints, 200 artifacts, 200 op inputs
    .venv/bin/python benchmarks/fuzz.py --counts 20,20,20 --no-record

Writes benchmarks/results/<machine>/fuzz.{json,md}; exits 1 if any case failed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    from aqlm_compile.bench.fuzz import FAMILIES, FULL_COUNTS

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--counts", default=",".join(str(FULL_COUNTS[f]) for f in FAMILIES),
                    help="cases per family: checkpoint,artifact,op")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default=None, help="folder for the seed checkpoint and artifact (default: the cache)")
    ap.add_argument("--no-record", action="store_true", help="print only; write no result file")
    args = ap.parse_args()

    from rich.progress import Progress

    from aqlm_compile.bench.fuzz import make_seeds, run_fuzz
    from aqlm_compile.bench.machine import machine_info, machine_slug
    from aqlm_compile.bench.records import write_result
    from aqlm_compile.cache import cache_root

    counts = dict(zip(FAMILIES, (int(c) for c in args.counts.split(","))))
    start = time.time()
    seeds = make_seeds(Path(args.work) if args.work else cache_root() / "fuzz-seeds")
    with Progress() as bar:
        tasks = {f: bar.add_task(f"{f} cases", total=n) for f, n in counts.items()}
        result = run_fuzz(seeds, counts, seed=args.seed, progress=lambda f, i, r: bar.advance(tasks[f]))
    machine = machine_info(measure_bandwidth=False)
    record = {"what": "fuzz: corrupted checkpoints, artifacts and ORT op inputs; every case must end in a clean "
                      "one-line error or be accepted",
              "command": " ".join(["python", "benchmarks/fuzz.py", *sys.argv[1:]]), "counts": counts,
              "seed": args.seed, "totals": result["totals"], "all": result["all"], "failures": result["failures"],
              "machine": machine, "wall_s": round(time.time() - start, 1)}
    lines = [f"# Fuzz totals (seed {args.seed})", "",
             f"`{record['command']}` on {machine.get('cpu')}, {machine.get('cores')} cores, {record['wall_s']} s.", "",
             "| family | tried | accepted | clean errors | unclean errors | crashes | hangs |",
             "|---|---|---|---|---|---|---|"]
    for family, t in [*result["totals"].items(), ("all", result["all"])]:
        lines.append(f"| {family} | {t['tried']} | {t['accepted']} | {t['clean']} | {t['unclean']} | {t['crash']} | "
                     f"{t['hang']} |")
    if result["failures"]:
        lines += ["", "Failing cases (family, seed, index: what was done → what happened):", ""]
        lines += [f"- {f['family']} {f['seed']} {f['index']}: {f['what']} → {f['outcome']}: {f.get('message', '')}"
                  for f in result["failures"][:50]]
    markdown = "\n".join(lines) + "\n"
    if args.no_record:
        print(markdown)
    else:
        write_result(ROOT / "benchmarks" / "results" / machine_slug(machine), "fuzz", record, markdown)
    sys.exit(1 if result["failures"] else 0)


if __name__ == "__main__":
    main()
