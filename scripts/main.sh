#!/usr/bin/env bash
# The main job on the embedded default: install, quantize SmolLM2-135M at 2x8g8 (--preset fast), then print
# FP, AQLM and RTN perplexities and bits per parameter on the held-out Brown text.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
OUT=${OUT:-runs/smollm2-135m-2x8g8-fast}
.venv/bin/aqlm-compile quantize -o "$OUT" --config 2x8g8 --preset fast --resume
.venv/bin/aqlm-compile eval "$OUT"
