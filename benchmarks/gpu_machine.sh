#!/usr/bin/env bash
# Every GPU figure on a machine with its own CUDA PyTorch and no network, in two calls:
#   bash benchmarks/gpu_machine.sh WHEELS_DIR RESULTS_DIR prefill                     # 4 min on an H200 without Inductor
#   bash benchmarks/gpu_machine.sh WHEELS_DIR RESULTS_DIR targets [ONNX_DEMO_BUNDLE]  # about 5 minutes
# prefill: a smoke run of benchmarks.gpu at 1/64 width and 4 layers (stops there if it fails: a broken script costs a
# minute, not the lease), then benchmarks.gpu at LLaVA-1.5-7B geometry (172 s on an H200 before its Inductor
# compiles, which start only in its first 260 s; the whole part fits one 600 s call). targets: the trace matrix's CUDA rows (LLaVA-1.5-7B geometry, bf16
# and fp16; 70 s) and the aot-inductor / torch-compile targets on the demo (benchmarks.gpu_targets; the aot-inductor
# packages alone took 130 s; ONNX_DEMO_BUNDLE saves compiling the onnxruntime bundle).
# WHEELS_DIR holds what this project needs beyond that machine's packages (see the README's GPU section for the
# pip download line); they are installed into /tmp/site, ahead of the machine's own, and this checkout is imported
# from where it is (an editable install would need the network). Results are written to RESULTS_DIR as they come,
# so a run cut short keeps what it measured.
set -uo pipefail
usage="usage: bash benchmarks/gpu_machine.sh WHEELS_DIR RESULTS_DIR prefill|targets [ONNX_DEMO_BUNDLE]"
wheels=${1:?$usage}
out=${2:?$usage}
part=${3:?$usage}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$wheels"/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1  # a crash prints the Python stack
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,temperature.gpu --format=csv,noheader
python3 -c "import torch, transformers, clse_fx; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())" || exit 1
status=0
case "$part" in
prefill)
    timeout 90 python3 -m benchmarks.gpu --smoke --deadline 0 --out "$out/gpu_smoke.json" > "$out/gpu_smoke.log" 2>&1 || { grep -v USDT "$out/gpu_smoke.log" | tail -30; exit 2; }
    grep -v USDT "$out/gpu_smoke.log" | tail -8
    timeout 480 python3 -m benchmarks.gpu --out "$out/gpu.json" --deadline 260 > "$out/gpu.log" 2>&1 || status=$?
    grep -v USDT "$out/gpu.log" | tail -25
    ;;
targets)
    cp benchmarks/results/trace_matrix.json "$out/trace_matrix.json"
    timeout 120 python3 -m benchmarks.trace_matrix --device cuda --dtype bfloat16 --dtype float16 --out "$out/trace_matrix.json" > "$out/trace_matrix.log" 2>&1 || status=$?
    grep -v USDT "$out/trace_matrix.log" | tail -6
    onnx=()
    [ -n "${4:-}" ] && onnx=(--onnx-bundle "$4")
    timeout 300 python3 -m benchmarks.gpu_targets "${onnx[@]}" --out "$out/gpu_targets.json" > "$out/gpu_targets.log" 2>&1 || status=$?
    grep -v -e USDT -e warning "$out/gpu_targets.log" | tail -10
    ;;
*) echo "$usage"; exit 1 ;;
esac
exit $status
