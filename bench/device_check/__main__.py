"""``python -m device_check`` (with ``bench/`` on ``PYTHONPATH``; ``bench/device_check.sh`` does it):

    run --part kernels|trainer --out DIR --work DIR [--t0 EPOCH] [--budget S] [--steps "a b"] [--time-scale X]
        run the part's steps (all, or the named ones), write summary.txt and raw.tar.gz into DIR
    summary --part P --out DIR --work DIR      rewrite summary.txt from what the steps left
    plan [--part P]                            the steps, their caps and estimates; runs nothing
    env                                        the Python half of env.txt
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from .budget import PART_BUDGET_S, check_budgets, table


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m device_check", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run a part")
    s = sub.add_parser("summary", help="rewrite summary.txt")
    for p in (r, s):
        p.add_argument("--part", choices=list(PART_BUDGET_S), required=True)
        p.add_argument("--out", required=True)
        p.add_argument("--work", required=True)
    r.add_argument("--t0", type=float, default=None, help="the part's start, epoch seconds (default: now)")
    r.add_argument("--budget", type=float, default=None, help="seconds for the whole part (default: its budget)")
    r.add_argument("--steps", default=None, help="space-separated steps of the part to run (default: all)")
    r.add_argument("--xdist-workers", type=int, default=8, help="test processes on CUDA (0: off)")
    r.add_argument("--time-scale", type=float, default=1.0,
                   help="every cap and the budget x this: a dry run on a slow machine (default 1)")
    pl = sub.add_parser("plan", help="print the steps, caps and estimates")
    pl.add_argument("--part", choices=list(PART_BUDGET_S), default=None)
    sub.add_parser("env", help="the Python half of env.txt")
    args = ap.parse_args(argv)

    if args.cmd == "plan":
        for part in [args.part] if args.part else list(PART_BUDGET_S):
            print(table(part))
        problems = check_budgets()
        for p in problems:
            print("PROBLEM " + p)
        return 1 if problems else 0
    if args.cmd == "env":
        from .env import facts

        print("\n".join(facts()))
        return 0
    if args.cmd == "summary":
        from .summary import write_summary

        sys.stdout.write(write_summary(args.part, args.out, args.work))
        return 0
    from .runner import context, run_part

    ctx = context(args.part, args.out, args.work, t0=args.t0, budget=args.budget, xdist_workers=args.xdist_workers,
                  time_scale=args.time_scale)
    names = args.steps.split() if args.steps else None
    text = run_part(ctx, names)
    sys.stdout.write(f"\n==================== SUMMARY, part {args.part}\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
