#!/usr/bin/env bash
# Install (idempotent) and run the test suite (slow full-model runs excluded; see pyproject's markers).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Two workers (pytest-xdist), one test module each at a time (--dist loadfile keeps a module's fixtures in one
# process): most of the suite is TVM/LLVM compilation, which runs on one core.
.venv/bin/python -m pytest -q -n 2 --dist loadfile "$@"
