"""Does RL from SmolLM2-135M-Instruct's warm start raise greedy test EM?  The criterion, per seed.

    for s in 1 2 3; do SECONDS=0; tspo-fast train --config configs/smollm2.yaml --set seed=$s \\
        --set output_dir=runs/smollm2_s$s && echo $SECONDS > runs/smollm2_s$s/wall_s.txt; done
    python bench/smollm2_rl.py runs/smollm2_s1 runs/smollm2_s2 runs/smollm2_s3 --md runs/smollm2_rl.md

Each run of ``configs/smollm2.yaml`` evaluates greedily on all 300 test questions before its first
step (the warm start) and after its last.  A run passes when the final EM exceeds the warm start's
by more than three binomial standard deviations of an EM on those questions,
``3 * sqrt(p (1 - p) / n)`` with ``p`` the warm start's EM (at least ``1 / n`` when it is 0); the
result passes when every run does.  Every run is reported, whatever it shows, with its wall time
(``wall_s.txt``, as the loop above or ``tspo-fast compare`` write it) and the seconds its steps took
(the sum of ``time/step``; evaluations not included).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Dict, List, Sequence

from tspo_fast.training.metrics import read_metrics

SDS = 3.0


def threshold(p0: float, n: int, sds: float = SDS) -> float:
    """The gain over a warm-start EM ``p0`` on ``n`` questions that counts: ``sds`` binomial sd."""
    p = max(p0, 1.0 / n)
    return sds * math.sqrt(p * (1.0 - p) / n)


def run_result(run_dir: str) -> Dict[str, object]:
    """One run's first and last evaluation, the gain, the threshold, whether it passes."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        raise SystemExit(f"{run_dir}: no metrics.jsonl (is it a training run's output_dir?)")
    rows = read_metrics(path)
    evals = [r for r in rows if "eval/em" in r]
    if len(evals) < 2 or evals[0]["step"] != 0:
        raise SystemExit(f"{path}: needs an evaluation at step 0 and a later one "
                         f"(got steps {[r['step'] for r in evals]}; train.eval_at_start, train.eval_every)")
    first, last = evals[0], evals[-1]
    n = int(last.get("eval/n", 0))
    if n <= 0 or int(first.get("eval/n", 0)) != n:
        raise SystemExit(f"{path}: the evaluations at steps 0 and {last['step']} must use the same questions "
                         f"(eval/n {first.get('eval/n')} and {last.get('eval/n')})")
    gain = last["eval/em"] - first["eval/em"]
    need = threshold(first["eval/em"], n)
    wall = os.path.join(run_dir, "wall_s.txt")
    return {"run": run_dir, "steps": last["step"], "n": n, "em_before": first["eval/em"], "em_after": last["eval/em"],
            "gain": gain, "threshold": need, "passes": gain > need,
            "searches_before": first.get("eval/searches"), "searches_after": last.get("eval/searches"),
            "steps_s": sum(r.get("time/step", 0.0) for r in rows if "reward/mean" in r),
            "wall_s": float(open(wall).read()) if os.path.exists(wall) else None}


def markdown(results: Sequence[Dict[str, object]]) -> str:
    lines = ["| run | steps | n | EM before RL | EM after | gain | 3 sd | passes | searches before → after "
             "| steps' s | wall s |", "|---|---:|---:|---:|---:|---:|---:|---|---|---:|---:|"]
    for r in results:
        s0, s1 = r["searches_before"], r["searches_after"]
        searches = f"{s0:.2f} → {s1:.2f}" if s0 is not None and s1 is not None else "n/a"
        lines.append(f"| {r['run']} | {r['steps']} | {r['n']} | {r['em_before']:.3f} | {r['em_after']:.3f} | "
                     f"{r['gain']:+.3f} | {r['threshold']:.3f} | {'yes' if r['passes'] else 'no'} | {searches} | "
                     f"{r['steps_s']:.0f} | {'n/a' if r['wall_s'] is None else format(r['wall_s'], '.0f')} |")
    verdict = all(r["passes"] for r in results)
    lines += ["", f"Every run passes: **{'yes' if verdict else 'no'}** ({sum(bool(r['passes']) for r in results)} "
              f"of {len(results)})."]
    return "\n".join(lines) + "\n"


def main(argv: List[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="the runs' output_dir folders")
    ap.add_argument("--md", help="also write the table to this Markdown file")
    args = ap.parse_args(argv)
    text = markdown([run_result(r) for r in args.runs])
    print(text, end="")
    if args.md:
        with open(args.md, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
