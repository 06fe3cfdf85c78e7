#!/usr/bin/env bash
# Every GPU figure in one run on a machine with its own CUDA PyTorch and no network (about 6 minutes on an H100):
#   bash benchmarks/gpu_machine.sh WHEELS_DIR [RESULTS_DIR]
# WHEELS_DIR holds the wheels this project needs beyond that PyTorch (transformers at least; fetch them beforehand
# with `pip download --no-deps transformers==5.24.0 -d WHEELS_DIR`). Results land in benchmarks/results/ and are
# copied to RESULTS_DIR when given.
set -euo pipefail
wheels=${1:?usage: bash benchmarks/gpu_machine.sh WHEELS_DIR [RESULTS_DIR]}
python -m pip install -q --no-deps "$wheels"/*.whl
python -m pip install -q --no-deps -e .
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
status=0
timeout 300 python -m benchmarks.gpu || status=$?
timeout 240 python -m benchmarks.trace_matrix --device cuda || status=$?
if [ -n "${2:-}" ]; then
    mkdir -p "$2" && cp benchmarks/results/gpu.json benchmarks/results/trace_matrix.json "$2"/ 2>/dev/null || true
fi
exit $status
