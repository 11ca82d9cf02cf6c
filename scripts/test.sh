#!/usr/bin/env bash
# Install (idempotent) and run the test suite (slow full-model runs excluded; see pyproject's markers).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m pytest -q "$@"
