"""Launching the tests' child processes: a free loopback port, and ``torchrun`` on one.

The tests run in parallel (pytest-xdist), so two of them may launch ``torchrun`` at once: each
launch takes its own free port instead of torchrun's default 29500, which the second would find
in use.
"""
from __future__ import annotations

import socket
import sys


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int = 2) -> list[str]:
    """The command line that starts ``nproc`` ranks with ``torch.distributed.run`` on a free port."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_port", str(free_port())]
