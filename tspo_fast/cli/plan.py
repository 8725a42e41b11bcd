"""``tspo-fast plan --config CFG --gpus N --gpu-memory-gib M``: the per-rank memory budget of a run.

Prints every term (model states, reference, vLLM and what it keeps asleep, activations, K3,
margin) and the rollout and update peaks; exits 1, naming the fields to change, when the config
does not fit.  The peaks must fit ``--gpu-free-gib`` (default: the whole card); the trainer checks
the same plan against the memory free on each rank's GPU before it starts.
"""
from __future__ import annotations

import argparse
from typing import List, Optional

from ..config import load_config
from ..training.plan import plan_memory

__all__ = ["main"]


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="tspo-fast plan", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--gpus", type=int, required=True, help="number of GPUs (one rank each)")
    ap.add_argument("--gpu-memory-gib", type=float, required=True, help="memory of one GPU, GiB (H100: 79.6, H200: 139.8)")
    ap.add_argument("--gpu-free-gib", type=float, default=None,
                    help="memory free on one GPU before the run, GiB (nvidia-smi's total - used; default: all of it)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--no-sleep", action="store_true", help="vLLM keeps its memory during the update")
    ap.add_argument("--vllm-sleep-residue-gib", type=float, default=None,
                    help="what vLLM keeps through sleep (CUDA graphs, runner buffers), GiB; default: the plan's "
                         "estimate (tspo_fast/training/plan.py, VLLM_SLEEP_RESIDUE_GIB)")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    plan = plan_memory(cfg, args.gpus, args.gpu_memory_gib, free_gib=args.gpu_free_gib,
                       sleep=False if args.no_sleep else None, sleep_residue_gib=args.vllm_sleep_residue_gib)
    print(plan.table())
    return 0 if plan.fits else 1
