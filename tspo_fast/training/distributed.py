"""torch.distributed set up the DeepSpeed way, and the few reductions the update needs.

Scale-out is DeepSpeed's: ``deepspeed`` (hostfile, several nodes) or ``torchrun`` set the
environment; a plain ``python`` process becomes a world of one on a free local port.
"""
from __future__ import annotations

import contextlib
import os
import random
import socket
import sys

import deepspeed
import numpy as np
import torch
import torch.distributed as dist

from .locks import clear_stale_build_locks

__all__ = ["init_distributed", "stdout_to_stderr", "shutdown", "rank", "world_size", "local_device", "seed_everything",
           "global_sum", "global_max", "barrier", "all_gather_objects"]


def local_device() -> torch.device:
    """This rank's own device: ``cuda:LOCAL_RANK`` (``cuda:0`` when the process sees one GPU, e.g.
    one ``CUDA_VISIBLE_DEVICES`` entry per rank), or the CPU without CUDA."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    local, n = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
    if n == 1:
        return torch.device("cuda", 0)
    if local >= n:
        raise RuntimeError(f"LOCAL_RANK={local} but this process sees {n} GPU(s): launch at most one rank per GPU "
                           "(deepspeed --num_gpus / torchrun --nproc_per_node)")
    return torch.device("cuda", local)


@contextlib.contextmanager
def stdout_to_stderr():
    """Everything written to stdout inside (Python's ``sys.stdout`` and file descriptor 1, so also
    compilers a build starts) goes to stderr: a command's stdout keeps its own output only."""
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:                      # no file descriptor 1 (a closed stdout): Python-level only
        saved = None
    try:
        if saved is not None:
            os.dup2(2, 1)
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        if saved is not None:
            os.dup2(saved, 1)
            os.close(saved)


def init_distributed() -> None:
    """Initialise torch.distributed (env from deepspeed/torchrun, or a single local process); on
    CUDA the rank's own GPU (:func:`local_device`) becomes the current device first, so that
    everything allocated before DeepSpeed's engine (the memory check, NCCL's communicator) lands
    there and not on GPU 0.

    DeepSpeed builds or loads its shared-memory op here, under a lock file a killed build leaves
    behind: stale locks are cleared first (:func:`~tspo_fast.training.locks.clear_stale_build_locks`),
    and the build's output goes to stderr."""
    if dist.is_initialized():
        return
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_device())
    clear_stale_build_locks()
    with stdout_to_stderr():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")


def shutdown() -> None:
    """Tear the process group down (a gloo group left to interpreter exit can abort the process).

    Best effort: an engine that shares the process (vLLM) may already have replaced or torn
    down the default group."""
    if not dist.is_initialized():
        return
    try:
        dist.barrier()
        dist.destroy_process_group()
    except (ValueError, RuntimeError):
        pass


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_gather_objects(obj) -> list:
    """Every rank's ``obj`` (picklable), in rank order, on every rank; ``[obj]`` without a world."""
    if not dist.is_initialized() or world_size() == 1:
        return [obj]
    out: list = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _reduce_device() -> torch.device:
    """NCCL reduces CUDA tensors only; gloo takes CPU tensors."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _reduce(x: float, op) -> float:
    if not dist.is_initialized() or world_size() == 1:
        return float(x)
    t = torch.tensor([float(x)], dtype=torch.float64, device=_reduce_device())
    dist.all_reduce(t, op=op)
    return float(t.item())


def global_sum(x: float) -> float:
    """``x`` summed over all ranks."""
    return _reduce(x, dist.ReduceOp.SUM)


def global_max(x: float) -> float:
    """The largest ``x`` of all ranks."""
    return _reduce(x, dist.ReduceOp.MAX)
