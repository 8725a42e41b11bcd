"""``tspo-fast plan --config CFG --gpus N --gpu-memory-gib M``: the per-rank memory budget of a run.

Prints every term (model states, reference, vLLM, activations, K3, margin) and the rollout and
update peaks; exits 1, naming the fields to change, when the config does not fit.
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
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--no-sleep", action="store_true", help="vLLM keeps its memory during the update")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    plan = plan_memory(cfg, args.gpus, args.gpu_memory_gib, sleep=False if args.no_sleep else None)
    print(plan.table())
    return 0 if plan.fits else 1
