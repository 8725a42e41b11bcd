"""The ``tspo-fast`` command: one subcommand per job, each a module of this package with a
``main(argv)``, imported when its subcommand runs (``tspo-fast demo`` does not load DeepSpeed)."""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

#: subcommand -> (module, help)
COMMANDS = {
    "train": ("tspo_fast.cli.train", "train a policy (TSPO or GRPO) from a YAML config"),
    "eval": ("tspo_fast.cli.eval", "greedy evaluation: EM per data source, turns, searches"),
    "compare": ("tspo_fast.cli.compare", "train configs over several seeds; paired table and PNG of test EM"),
    "plot": ("tspo_fast.cli.plot", "draw reward/EM curves of runs to a PNG"),
    "plan": ("tspo_fast.cli.plan", "per-rank GPU memory budget of a config; fails naming the fields to change"),
    "demo": ("tspo_fast.cli.demo", "FOLR rewards and TSPO vs GRPO advantages on one group of rollouts"),
    "agreement": ("tspo_fast.cli.agreement", "measure K1 (token ids) vs the string rule of FOLR"),
    "index": ("tspo_fast.cli.retrieval", "build retrieval indexes (BM25, dense)"),
    "retriever": ("tspo_fast.cli.retrieval", "serve or query a retrieval index"),
}


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="tspo-fast",
                                     description="TSPO training, retrieval and kernels for search-augmented RL")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, text) in COMMANDS.items():
        sub.add_parser(name, help=text, add_help=False)
    args, rest = parser.parse_known_args(argv[:1])
    module = importlib.import_module(COMMANDS[args.command][0])
    if args.command in ("index", "retriever"):      # one module, two command groups
        return module.main(argv) or 0
    return module.main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
