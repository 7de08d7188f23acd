#!/usr/bin/env bash
# The GPU check on a lent machine (Python 3.12, PyTorch, no TensorFlow, no network): installs the
# wheels carried in .whl/ (keras, optuna and what they need; see benchmarks/README.md), then runs
# benchmarks/gpu_check.py on the torch backend. Prints images/s and seconds per head trial.
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export KERAS_BACKEND="${KERAS_BACKEND:-torch}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || true
exec timeout 290 python3 benchmarks/gpu_check.py "$@"
