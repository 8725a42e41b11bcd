"""The Python half of ``env.txt``: interpreter, torch (and its CUDA), triton, the device, where
``tspo_kernels`` is imported from, and which optional packages import (after the shell's offline
installs).  Prints plain ``name value`` lines; never fails on a missing package."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from typing import Dict, List

#: import names the steps need, by what needs them
OPTIONAL = {"pytest_benchmark": "benchmarks", "pytest_timeout": "per-test timeouts", "xdist": "parallel tests",
            "liger_kernel": "the Liger rows", "deepspeed": "update and train", "bm25s": "train's retriever"}


def available() -> Dict[str, bool]:
    """Which of :data:`OPTIONAL` can be imported here (found, not imported)."""
    return {name: importlib.util.find_spec(name) is not None for name in OPTIONAL}


def facts() -> List[str]:
    import torch
    import triton

    lines = [f"python {sys.version.split()[0]} {sys.executable}",
             f"torch {torch.__version__} cuda {torch.version.cuda} available {torch.cuda.is_available()}",
             f"triton {triton.__version__}"]
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        lines.append(f"device {p.name} cc {p.major}.{p.minor} SMs {p.multi_processor_count} memory GiB "
                     f"{round(p.total_memory / 2**30, 1)}")
    try:
        import tspo_kernels

        lines.append(f"tspo_kernels from {tspo_kernels.__file__}")
    except ImportError as exc:
        lines.append(f"tspo_kernels does not import: {exc}")
    for name, what in OPTIONAL.items():
        lines.append(f"{name} {'found' if importlib.util.find_spec(name) else 'missing'} ({what})")
    pip = subprocess.run([sys.executable, "-m", "pip", "list", "--disable-pip-version-check"], capture_output=True,
                         text=True, timeout=60)
    wanted = ("torch", "triton", "pytest", "pytest-benchmark", "pytest-timeout", "pytest-xdist", "liger-kernel",
              "liger_kernel", "transformers", "numpy", "deepspeed", "bm25s")
    lines += ["pip: " + line for line in pip.stdout.splitlines() if line.split(" ")[0].lower() in wanted]
    return lines


if __name__ == "__main__":
    print("\n".join(facts()))
