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


def pytest_xdist_auto_num_workers(config):
    """``-n auto`` (pyproject.toml's default for the tests) runs benchmarks in this one process: a
    timing needs the machine to itself, and pytest-benchmark turns itself off under workers."""
    return 0
