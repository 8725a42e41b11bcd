"""The end of a run as a short report: what it reached, where its time went, where its files are.

``tspo-fast train`` prints :func:`run_report` when it finishes.  It reads the run's metric rows
(those of ``metrics.jsonl``: one per step, and the initial evaluation as step 0); every value is
shown with the step it comes from, and the raw values stay in ``metrics.jsonl``
(docs/metrics.md).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

__all__ = ["run_report", "PHASES"]

#: (label, metric) of the phases whose mean time per step the report gives
PHASES: Tuple[Tuple[str, str], ...] = (("rollout", "time/rollout"), ("log-probs", "time/logprobs"),
                                       ("update", "time/update"), ("sync", "time/sync"), ("step", "time/step"))


def _duration(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.2f} s"
    if seconds < 60:
        return f"{seconds:.1f} s"
    m, s = divmod(int(round(seconds)), 60)
    if m < 60:
        return f"{m} min {s:02d} s"
    h, m = divmod(m, 60)
    return f"{h} h {m:02d} min"


def _first_last(rows: Sequence[Dict[str, Any]], key: str, fmt) -> str:
    """``first (step a) -> last (step b)`` of ``key`` over ``rows`` that have it; "not logged" without any."""
    have = [r for r in rows if isinstance(r.get(key), (int, float))]
    if not have:
        return "not logged"
    a, b = have[0], have[-1]
    if a is b:
        return f"{fmt(a[key])} (step {a['step']})"
    return f"{fmt(a[key])} (step {a['step']}) -> {fmt(b[key])} (step {b['step']})"


def run_report(rows: Sequence[Dict[str, Any]], *, output_dir: str, total_steps: Optional[int] = None,
               first_step: int = 0, wall_seconds: Optional[float] = None, checkpoint: Optional[str] = None,
               metrics_file: Optional[str] = None, curves: Optional[str] = None,
               export: Optional[str] = None) -> str:
    """The report of a run, from its metric ``rows`` (each with its ``step``).

    ``total_steps``: ``train.total_steps``; ``first_step``: the step this invocation started at
    (a resumed run); ``wall_seconds``: this invocation's wall-clock time (``tspo-fast train``: from
    reading the config on); the paths: the newest
    checkpoint, ``metrics.jsonl``, ``curves.png`` and the export, each when there is one."""
    train = [r for r in rows if "reward/mean" in r]
    evals = [r for r in rows if "eval/em" in r]
    last = train[-1]["step"] if train else first_step
    steps = f"{last}" + (f" of {total_steps} (train.total_steps)" if total_steps is not None else "")
    if first_step:
        steps += f"; this run: {max(last - first_step, 0)}, resumed at step {first_step}"
    if evals:
        em = _first_last(evals, "eval/em", lambda v: f"{v:.3f}")
        n = evals[-1].get("eval/n")
        em += f" on {int(n)} test questions" if isinstance(n, (int, float)) else ""
    else:
        em = "not evaluated (train.eval_every: 0, or no test questions)"
    times = []
    for label, key in PHASES:
        values = [r[key] for r in train if isinstance(r.get(key), (int, float))]
        if values:
            times.append(f"{label} {_duration(sum(values) / len(values))}")
    lines: List[Tuple[str, str]] = [
        ("steps", steps),
        ("train reward", _first_last(train, "reward/mean", lambda v: f"{v:.3f}")),
        ("greedy test EM", em),
        ("searches per rollout", _first_last(train, "rollout/searches", lambda v: f"{v:.2f}")),
        ("valid actions", _first_last(train, "env/ratio_of_valid_action", lambda v: f"{100 * v:.0f}%")),
        ("mean time per phase", (", ".join(times) + f" (over {len(train)} steps)") if times else "no step timed"),
    ]
    if wall_seconds is not None:
        lines.append(("wall time", _duration(wall_seconds)))
    lines.append(("output_dir", output_dir))
    lines.append(("latest checkpoint", checkpoint or "none written"))
    lines.append(("metrics", metrics_file or "no metrics.jsonl (logging.backends has no jsonl)"))
    if curves:
        lines.append(("curves", curves))
    if export:
        lines.append(("export", export))
    width = max(len(k) for k, _ in lines)
    return "\n".join(["run summary"] + [f"  {k.ljust(width)}  {v}" for k, v in lines])
