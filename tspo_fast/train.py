"""Training entry point.

    deepspeed tspo_fast/train.py --config configs/7b.yaml [--set advantage.mode=grpo ...] [--resume]
    torchrun --nproc_per_node 2 tspo_fast/train.py --config configs/tiny.yaml
    tspo-fast train --config configs/tiny.yaml
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

if __package__ in (None, ""):  # run as a script by the deepspeed launcher or torchrun
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build_parser(prog: str = "tspo-fast train") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description="Train a search agent with TSPO (or the GRPO baseline)")
    ap.add_argument("--config", default=None, help="YAML config (default: the embedded tiny config)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config field, e.g. --set advantage.mode=grpo (repeatable)")
    ap.add_argument("--resume", action="store_true", help="continue from <output_dir>/checkpoints/latest")
    ap.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (this run)")
    ap.add_argument("--export", default=None, help="write the final policy in Hugging Face format here")
    ap.add_argument("--no-plot", action="store_true", help="do not draw <output_dir>/curves.png at the end")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return ap


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from tspo_fast.config import load_config
    from tspo_fast.trainer import Trainer

    path = args.config
    if path is None:
        path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "tiny.yaml")
    cfg = load_config(path, args.overrides)
    trainer = Trainer(cfg, resume=args.resume)
    last = trainer.fit(max_steps=args.max_steps)
    if trainer.rank == 0 and last:
        print("final step", trainer.step, {k: round(v, 4) for k, v in last.items() if isinstance(v, float)})
    if args.export:
        from tspo_fast.checkpoint import export_hf
        export_hf(trainer.actor, trainer.lm, trainer.tokenizer, args.export)
    if trainer.rank == 0 and not args.no_plot:
        from tspo_fast.plot import plot_runs
        print("curves:", plot_runs([cfg.output_dir], os.path.join(cfg.output_dir, "curves.png")))
    trainer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
