#!/usr/bin/env bash
# Kernel benchmark on this x86 CPU: every AQLM kernel vs torch dense fp32 (MKL) and the aqlm package's numba kernel,
# same run, hot and cold, with the memory-bandwidth bound. Run it on a quiet machine (nothing else on the cores).
# Writes benchmarks/results/kernels-x86.{json,md}.
set -euo pipefail
cd "$(dirname "$0")/.."
source .venv/bin/activate
mkdir -p benchmarks/results
aqlm-compile bench --kernels \
  --shapes "${SHAPES:-4096x4096,11008x4096,4096x11008,28672x8192,576x576,1536x576,576x1536}" \
  --configs "${CONFIGS:-2x8g8,1x16g8,1x8g8,8x8g32}" --batch "${BATCHES:-1,4,16}" --rounds "${ROUNDS:-3}" \
  --json-out benchmarks/results/kernels-x86.json --markdown benchmarks/results/kernels-x86.md
