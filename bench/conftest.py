"""Benchmarks: on a machine without CUDA the Triton kernels run in the interpreter.

That measures the interpreter, not the kernel: CPU figures for Triton are correctness
smoke-checks only.  Real figures come from a CUDA device (see bench/RESULTS.md).
"""
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(__file__))
