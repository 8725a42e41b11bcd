"""The ``tspo-fast`` command: one subcommand per job."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="tspo-fast", description="TSPO training, retrieval and kernels for search-augmented RL")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="FOLR rewards and TSPO vs GRPO advantages on one group of rollouts")
    p.set_defaults(func=lambda args: __import__("tspo_fast.demo", fromlist=["run"]).run())

    for name, module, text in (
            ("agreement", "tspo_fast.agreement", "measure K1 (token ids) vs the string rule of FOLR"),
            ("train", "tspo_fast.train", "train a policy (TSPO or GRPO) from a YAML config"),
            ("eval", "tspo_fast.evaluate_cli", "greedy evaluation: EM per data source, turns, searches"),
            ("plot", "tspo_fast.plot", "draw reward/EM curves of runs to a PNG"),
            ("compare", "tspo_fast.compare", "train configs over several seeds; table and PNG of test EM")):
        p = sub.add_parser(name, help=text, add_help=False)
        p.set_defaults(func=None, module=module)
    try:
        from tspo_fast.retrieval.cli import add_subcommands
    except ImportError:  # retrieval extras missing: the other subcommands still work
        add_subcommands = None
    if add_subcommands is not None:
        add_subcommands(sub)

    args, rest = parser.parse_known_args(argv)
    if getattr(args, "module", None):
        return __import__(args.module, fromlist=["main"]).main(rest) or 0
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
