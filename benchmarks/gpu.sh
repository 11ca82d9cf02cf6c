#!/usr/bin/env bash
# GPU benchmark, offline, under 8 minutes on an H200: the CUDA numerics of every config, the GEMV kernels against
# cuBLAS FP16 at the Llama shapes with achieved GB/s, the CUDA whole-model decode of a tiny random model (made on
# the fly), and `quantize --device cuda` of one Llama-2-7B-shaped block (with --nproc 2 over NCCL on 2 GPUs). Results: OUT_DIR/gpu.json + gpu.md (default OUT_DIR: benchmarks/results/<gpu slug>, e.g. nvidia-h200).
#
#   bash benchmarks/gpu.sh [OUT_DIR] [--quick] [--dry-run] [--sections numerics,kernels,decode,quantize] [--archs sm_90] ...
#   bash benchmarks/gpu.sh --prepare     # on a machine with TVM's compiler + nvcc (no GPU needed): build every CUDA
#                                        # library into benchmarks/gpu-prebuilt/, for a GPU machine whose TVM is
#                                        # runtime-only (it is used there when TVM cannot compile; $PREBUILT overrides)
#
# Python: $PYTHON, else .venv/bin/python, else python3: the first that imports torch and tvm. Without the package
# installed, the repository's folders are mapped to aqlm_compile.{kernels,targets,passes} for the run.
# Exit status: 0 all ran, 1 a section failed (see the report), 2 no GPU / no usable python, 124 timed out.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
LIMIT_S=${GPU_BENCH_TIMEOUT_S:-480}

ARGS=()
PREPARE=0
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    --prepare) PREPARE=1 ;;
    --out|--archs|--ptx|--prebuilt|--sections|--budget-s)
      [ $# -ge 2 ] || { echo "error: $1 needs a value" >&2; exit 2; }
      ARGS+=("$1" "$2"); shift ;;
    -*) ARGS+=("$1") ;;
    *) ARGS+=(--out "$1") ;;
  esac
  shift
done
if [ "$PREPARE" = 1 ]; then
  ARGS=(--dry-run --out benchmarks/gpu-prebuilt "${ARGS[@]}")
fi

CANDIDATES=()
[ -n "${PYTHON:-}" ] && CANDIDATES+=("$PYTHON")
[ -x .venv/bin/python ] && CANDIDATES+=(.venv/bin/python)
CANDIDATES+=(python3)
PY=""
for c in "${CANDIDATES[@]}"; do
  if VERSIONS=$("$c" -c 'import sys, torch, tvm; print(sys.version.split()[0], "torch", torch.__version__,
                                                         "tvm", tvm.__version__)' 2>/dev/null); then
    PY=$c
    break
  fi
done
if [ -z "$PY" ]; then
  echo "error: no python with torch and tvm (tried: ${CANDIDATES[*]}); run 'bash scripts/setup.sh' or set PYTHON" >&2
  exit 2
fi

# The package maps kernels/, targets/ and passes/ to aqlm_compile.* (pyproject's package-dir); without an install,
# build that layout from symbolic links and keep the current folder off sys.path (PYTHONSAFEPATH, Python ≥ 3.11).
if ! "$PY" -c "import importlib.util as u, sys; sys.exit(0 if u.find_spec('aqlm_compile.targets') else 1)" \
     >/dev/null 2>&1; then
  SHIM=$(mktemp -d)
  trap 'rm -rf "$SHIM"' EXIT
  mkdir "$SHIM/aqlm_compile"
  for f in "$REPO"/aqlm_compile/*; do ln -s "$f" "$SHIM/aqlm_compile/"; done
  for d in kernels targets passes; do ln -s "$REPO/$d" "$SHIM/aqlm_compile/$d"; done
  export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}" PYTHONSAFEPATH=1
fi

if ! command -v nvcc >/dev/null 2>&1 && [ -x /usr/local/cuda/bin/nvcc ]; then
  export PATH="$PATH:/usr/local/cuda/bin"
fi
if [ -n "${PREBUILT:-}" ]; then
  ARGS+=(--prebuilt "$PREBUILT")
elif [ -f benchmarks/gpu-prebuilt/prebuilt/prebuilt.json ] && [ "$PREPARE" = 0 ]; then
  ARGS+=(--prebuilt benchmarks/gpu-prebuilt/prebuilt)
fi

echo "python: $PY ($VERSIONS)"
timeout --kill-after=15 "$LIMIT_S" env PYTHONUNBUFFERED=1 "$PY" -m aqlm_compile.bench.gpu "${ARGS[@]}"
rc=$?
if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
  echo "error: the GPU benchmark ran past ${LIMIT_S} s; the sections that finished are in the results folder" \
       "printed above" >&2
  exit 124
fi
exit "$rc"
