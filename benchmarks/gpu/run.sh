#!/usr/bin/env bash
# The GPU check in one command, on a CUDA machine whose image has torch and transformers but no
# network: install SRDE and what the image lacks from the wheels carried in benchmarks/gpu/wheels/
# (made beforehand, where pip reaches the index, by `python benchmarks/gpu/wheels.py build`), then run
# benchmarks/gpu/check.py with the arguments given (e.g. --json /some/dir/check.json).
# Without that folder, SRDE and deepspeed must be installed already (pip install -e ".[gpu]").
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON="${PYTHON:-python3}"
if [ -f benchmarks/gpu/wheels/manifest.json ]; then
    "$PYTHON" benchmarks/gpu/wheels.py install
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
exec "$PYTHON" benchmarks/gpu/check.py "$@"
