#!/usr/bin/env bash
# The main job on the embedded default: install, quantize SmolLM2-135M at 2x8g8 (--preset fast), print FP, AQLM
# and RTN perplexities and bits per parameter on the held-out Brown text, then compile the checkpoint for this x86
# CPU (TVM kernels + ONNX decoder + ONNX Runtime op library + whole model for the TVM runtime) and generate 32
# tokens with ONNX Runtime and with the TVM runtime.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
OUT=${OUT:-runs/smollm2-135m-2x8g8-fast}
.venv/bin/aqlm-compile quantize -o "$OUT" --config 2x8g8 --preset fast --resume
.venv/bin/aqlm-compile eval "$OUT"
if [ ! -f "$OUT-x86/manifest.json" ]; then
  .venv/bin/aqlm-compile build "$OUT" --target x86 -o "$OUT-x86"
fi
.venv/bin/aqlm-compile generate "$OUT-x86" "The history of the city begins" --runtime ort --max-new-tokens 32
.venv/bin/aqlm-compile generate "$OUT-x86" "The history of the city begins" --runtime tvm --max-new-tokens 32
