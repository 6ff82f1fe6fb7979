#!/usr/bin/env bash
# On the GPU machine, one command: the same bench locally and over a loopback tracker + server
# (CUDA target), side by side.
#
#   rpc/gpu_loopback.sh [ARTIFACT]          # default: compile the embedded model for $TARGET
#   TARGET="cuda -arch=sm_90" KEY=cuda PROMPTS=64,256,1024 REPEATS=5 rpc/gpu_loopback.sh
#
#   TUNE=2 TRIALS=64 rpc/gpu_loopback.sh ARTIFACT   # then tune the 2 biggest E0M4 decode kernels
#   rpc/gpu_loopback.sh --shape smollm2-135m --variant tvm_lite-e0m4   # a random-weight model
#
# Results (JSON and the servers' logs) go to $OUT (default rpc_loopback/). The tracker needs
# tornado and the tuning cost model xgboost: a GPU machine without a package registry gets them
# as wheels (pip download tornado xgboost-cpu ... here, pip install --target there).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
exec "$PY" -m tvm_lite.rpc.loopback "$@" --target "${TARGET:-cuda}" --key "${KEY:-cuda}" \
    --prompt-len "${PROMPTS:-64,256,1024}" --repeats "${REPEATS:-5}" \
    --decode-tokens "${DECODE:-32}" --out "${OUT:-rpc_loopback}" \
    --tune "${TUNE:-0}" --trials "${TRIALS:-64}"
