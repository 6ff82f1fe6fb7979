#!/usr/bin/env bash
# On the GPU machine, one command: the same bench locally and over a loopback tracker + server
# (CUDA target), side by side.
#
#   rpc/gpu_loopback.sh [ARTIFACT]          # default: compile the embedded model for $TARGET
#   TARGET="cuda -arch=sm_90" KEY=cuda PROMPTS=64,256,1024 REPEATS=5 rpc/gpu_loopback.sh
#
# Results (JSON and the servers' logs) go to $OUT (default rpc_loopback/).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
exec "$PY" -m tvm_lite.rpc.loopback "$@" --target "${TARGET:-cuda}" --key "${KEY:-cuda}" \
    --prompt-len "${PROMPTS:-64,256,1024}" --repeats "${REPEATS:-5}" \
    --decode-tokens "${DECODE:-32}" --out "${OUT:-rpc_loopback}"
