"""Per-step panels of runs (train reward, FOLR hits, searches, test EM) written to PNG files."""
from __future__ import annotations

import os
from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg")  # files only, no display

import matplotlib.pyplot as plt

from .metrics import read_metrics

__all__ = ["PANELS", "PlotError", "plot_runs", "save_panels"]


class PlotError(ValueError):
    """Nothing to draw from a run (an empty metrics log), or labels that do not match the runs."""


#: (metric, title) of each panel: what a run is trained on, what FOLR sees, how the policy searches, and
#: the test score (``reward/em`` is not drawn: with ``reward.outcome: em`` it is ``reward/mean``)
PANELS = [("reward/mean", "train reward (outcome)"), ("reward/folr_hit", "FOLR hit rate (answer retrieved)"),
          ("rollout/searches", "searches per rollout"), ("eval/em", "test EM (greedy)")]


def plot_runs(run_dirs: Sequence[str], out_png: str, labels: Optional[Sequence[str]] = None) -> str:
    """The panels of ``run_dirs`` (run folders or metrics JSONL files), one line per run, to ``out_png``.
    A run whose log has no values to draw, or ``labels`` not one per run, raise :class:`PlotError`."""
    if labels and len(labels) != len(run_dirs):
        raise PlotError(f"--labels: {len(labels)} label(s) for {len(run_dirs)} run(s); give one label per run")
    runs = []
    for run in run_dirs:
        path = run if run.endswith(".jsonl") else os.path.join(run, "metrics.jsonl")
        if not os.path.exists(path):
            raise FileNotFoundError(f"no metrics log at {path}")
        rows = read_metrics(path)
        if not any(key in r for r in rows for key, _ in PANELS):
            raise PlotError(f"{path}: the metrics log has no {', '.join(key for key, _ in PANELS)} values "
                            f"({len(rows)} row(s)): nothing to plot")
        runs.append((run, rows))
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4.2 * len(PANELS), 3.4))
    for i, (run, rows) in enumerate(runs):
        label = labels[i] if labels else os.path.basename(os.path.normpath(run))
        for ax, (key, _title) in zip(axes, PANELS):
            pts = [(r["step"], r[key]) for r in rows if key in r]
            if pts:
                ax.plot(*zip(*pts), marker="o" if len(pts) < 30 else None, ms=3, label=label)
    return save_panels(fig, axes, [title for _, title in PANELS], out_png)


def save_panels(fig, axes, titles: Sequence[str], out_png: str) -> str:
    """Title, label and grid the per-step panels, put the legend on the first, write the PNG."""
    for ax, title in zip(axes, titles):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
