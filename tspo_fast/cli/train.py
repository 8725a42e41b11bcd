"""``tspo-fast train``: train a policy from a YAML config (the body of ``tspo_fast/train.py``)."""
from __future__ import annotations

import argparse
import os
import time
from typing import List, Optional

from ..config import ConfigError, load_config
from ..training.plots import plot_runs
from ..training.report import run_report
from ..training.trainer import Trainer

__all__ = ["build_parser", "main", "DEFAULT_CONFIG"]

#: the embedded default, ``configs/tiny.yaml`` of the repository
DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                              "configs", "tiny.yaml")


def build_parser(prog: str = "tspo-fast train") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description="Train a search agent with TSPO (or the GRPO baseline)")
    ap.add_argument("--config", default=None, help="YAML config (default: the embedded tiny config)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config field, e.g. --set advantage.mode=grpo (repeatable)")
    ap.add_argument("--resume", nargs="?", const="latest", default=None, metavar="auto|latest|CHECKPOINT",
                    help="continue from <output_dir>/checkpoints: 'latest' (the default when given bare) the one "
                         "'latest' names, which must pass its manifest check; 'auto' the newest valid one (bad ones "
                         "are reported and skipped; no checkpoint: start fresh); or a checkpoint folder or name")
    ap.add_argument("--debug", action="store_true", help="on an error, show the whole traceback")
    ap.add_argument("--max-steps", type=int, default=None,
                    help="stop after this many steps (this run; 0: none, e.g. to --export a checkpoint)")
    ap.add_argument("--export", default=None, help="write the final policy in Hugging Face format here")
    ap.add_argument("--export-format", choices=["merged", "adapter"], default="merged",
                    help="LoRA runs: export the merged model (default) or the adapter alone")
    ap.add_argument("--no-plot", action="store_true", help="do not draw <output_dir>/curves.png at the end")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return ap


def main(argv: Optional[List[str]] = None, prog: str = "tspo-fast train") -> int:
    start = time.perf_counter()
    args = build_parser(prog).parse_args(argv)
    if args.max_steps is not None and args.max_steps < 0:
        raise ConfigError(f"--max-steps: must be >= 0, got {args.max_steps}")
    cfg = load_config(args.config or DEFAULT_CONFIG, args.overrides)
    trainer = Trainer(cfg, resume=args.resume)
    first_step = trainer.step
    trainer.fit(max_steps=args.max_steps)
    export = trainer.export(args.export, args.export_format) if args.export else None
    curves = None
    if trainer.rank == 0 and not args.no_plot and "jsonl" in cfg.logging.backends and trainer.step > 0:
        curves = plot_runs([cfg.output_dir], os.path.join(cfg.output_dir, "curves.png"))     # from metrics.jsonl
        trainer.logger.log_image("curves", curves, step=trainer.step)                # TensorBoard, wandb
    if trainer.rank == 0:
        metrics = trainer.logger.path if "jsonl" in cfg.logging.backends else None
        print(run_report(trainer.logger.rows, output_dir=cfg.output_dir, total_steps=cfg.train.total_steps,
                         first_step=first_step, wall_seconds=time.perf_counter() - start, checkpoint=trainer.checkpoint,
                         metrics_file=metrics, curves=curves, export=export), flush=True)
    trainer.close()
    return 0
