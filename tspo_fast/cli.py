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

    p = sub.add_parser("agreement", help="measure K1 (token ids) vs the string rule of FOLR", add_help=False)
    p.set_defaults(func=None, module="tspo_fast.agreement")

    args, rest = parser.parse_known_args(argv)
    if getattr(args, "module", None):
        return __import__(args.module, fromlist=["main"]).main(rest) or 0
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
