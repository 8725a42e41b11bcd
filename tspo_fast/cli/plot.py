"""``tspo-fast plot``: reward and EM curves of one or more runs to a PNG."""
from __future__ import annotations

import argparse
import os
from typing import List, Optional

from ..training.plots import plot_runs


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="tspo-fast plot", description="Draw reward/EM curves of runs to a PNG")
    ap.add_argument("runs", nargs="+", help="run output folders (holding metrics.jsonl) or JSONL files")
    ap.add_argument("--out", default=None, help="PNG path (default: <first run>/curves.png)")
    ap.add_argument("--labels", nargs="*", default=None)
    args = ap.parse_args(argv)
    out = args.out or os.path.join(args.runs[0], "curves.png")
    print(plot_runs(args.runs, out, args.labels))
    return 0
