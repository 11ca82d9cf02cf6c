"""Kernel speed of this checkout against an earlier commit, interleaved in one run: did a change slow a kernel?

    .venv/bin/python benchmarks/kernels_vs_commit.py BASE [--pairs 3] [--shapes 4096x4096] [--configs 2x8g8,1x16g8]
                                                      [--batch 1] [--threads 2]

BASE is checked out into a temporary git worktree; each pair runs `aqlm-compile bench --kernels` once on BASE and
once on this checkout (alternating which goes first), each in its own process with the same thread count, and the
median over pairs is compared. BASE's code is imported by pointing this venv's editable install at the worktree for
that process only. Writes benchmarks/results/<machine>/kernels-vs-<base>.{json,md} with the machine recorded.
Nothing else should run on the machine meanwhile (each run also records the torch fp32 matmul as a noise check).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Runs the CLI with the editable install's package folders remapped from this checkout to the worktree.
_BOOT = """
import sys
root, tree = sys.argv[1], sys.argv[2]
finders = [sys.modules[f.__module__] for f in sys.meta_path if hasattr(sys.modules.get(f.__module__), "MAPPING")]
if not finders:
    sys.exit("kernels_vs_commit: aqlm-compile is not an editable install here (pip install -e .)")
for finder in finders:
    for name, path in list(finder.MAPPING.items()):
        finder.MAPPING[name] = path.replace(root, tree, 1)
sys.path = [p for p in sys.path if p not in ("", root)]
sys.argv = ["aqlm-compile"] + sys.argv[3:]
from aqlm_compile.cli import main
main()
"""


def run_bench(tree: Path, args, out: Path) -> list[dict]:
    cmd = [sys.executable, "-c", _BOOT, str(ROOT), str(tree), "bench", "--kernels", "--shapes", args.shapes,
           "--configs", args.configs, "--batch", args.batch, "--rounds", str(args.rounds), "--threads",
           str(args.threads), "--json-out", str(out)]
    proc = subprocess.run(cmd, cwd=tree, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"bench --kernels in {tree} failed: {proc.stderr.strip()[-800:]}")
    return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("base", help="the commit to compare against")
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--shapes", default="4096x4096")
    ap.add_argument("--configs", default="2x8g8,1x16g8")
    ap.add_argument("--batch", default="1")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", help="output folder (default benchmarks/results/<machine>)")
    args = ap.parse_args()

    from aqlm_compile.bench.machine import machine_info, machine_slug
    from aqlm_compile.cache import atomic_write_bytes

    base = subprocess.run(["git", "rev-parse", "--short", args.base], cwd=ROOT, capture_output=True, text=True)
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    if base.returncode != 0:
        sys.exit(f"{args.base}: not a commit of {ROOT}")
    base_sha, head_sha = base.stdout.strip(), head.stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                capture_output=True, text=True).stdout.strip())
    machine = machine_info()
    start = time.time()
    runs = {"base": [], "head": []}
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "base"
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), base_sha], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            for i in range(args.pairs):
                order = ("base", "head") if i % 2 == 0 else ("head", "base")
                for side in order:
                    records = run_bench(tree if side == "base" else ROOT, args, Path(tmp) / f"{side}-{i}.json")
                    runs[side].append(records)
                    print(f"pair {i + 1}/{args.pairs} {side}: " + ", ".join(
                        f"{r['config']} {r['out_features']}x{r['in_features']} b{r['batch']} {r['ms']:.3f} ms"
                        for r in records), file=sys.stderr)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, capture_output=True)
    rows = []
    for j, first in enumerate(runs["base"][0]):
        def pick(side, key):
            return [run[j][key] for run in runs[side]]
        b, h = statistics.median(pick("base", "ms")), statistics.median(pick("head", "ms"))
        rows.append({"config": first["config"], "shape": f"{first['out_features']}x{first['in_features']}",
                     "batch": first["batch"], "kernel_base": runs["base"][0][j]["kernel"],
                     "kernel_head": runs["head"][0][j]["kernel"], "base_ms": pick("base", "ms"),
                     "head_ms": pick("head", "ms"), "base_median_ms": b, "head_median_ms": h,
                     "head_over_base": round(h / b, 3), "torch_fp32_ms_base": pick("base", "baseline_ms"),
                     "torch_fp32_ms_head": pick("head", "baseline_ms")})
    result = {"what": "aqlm-compile bench --kernels, this checkout (head) vs an earlier commit (base), interleaved",
              "command": "python benchmarks/kernels_vs_commit.py " + " ".join(sys.argv[1:]),
              "base": base_sha, "head": head_sha, "head_has_uncommitted_changes": dirty, "threads": args.threads,
              "pairs": args.pairs, "rounds": args.rounds, "machine": machine,
              "wall_s": round(time.time() - start, 1), "rows": rows}
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / machine_slug(machine)
    name = f"kernels-vs-{base_sha}"
    atomic_write_bytes(out / f"{name}.json", (json.dumps(result, indent=1) + "\n").encode())
    lines = [f"# Kernels: {head_sha}{' (+ uncommitted)' if dirty else ''} vs {base_sha}", "",
             f"{machine['cpu']}, {args.threads} threads, {args.pairs} interleaved pairs × {args.rounds} rounds; "
             f"medians over pairs. Command: `{result['command']}`.", "",
             "| config | shape | batch | kernel (base → head) | base ms | head ms | head/base | torch fp32 ms (base, head) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['shape']} | {r['batch']} | {r['kernel_base']} → {r['kernel_head']} | "
                     f"{r['base_median_ms']:.3f} | {r['head_median_ms']:.3f} | {r['head_over_base']:.2f} | "
                     f"{statistics.median(r['torch_fp32_ms_base']):.2f}, {statistics.median(r['torch_fp32_ms_head']):.2f} |")
    atomic_write_bytes(out / f"{name}.md", ("\n".join(lines) + "\n").encode())
    print(f"wrote {out / name}.json and .md", file=sys.stderr)


if __name__ == "__main__":
    main()
