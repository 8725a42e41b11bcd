"""Metrics log: one JSON object per line (``metrics.jsonl``) and TensorBoard scalars."""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional


class MetricsLogger:
    """Append step metrics to ``<dir>/metrics.jsonl`` and ``<dir>/tensorboard``.

    Only rank 0 writes.  On resume the JSONL is truncated to the steps up to the checkpoint,
    so the log of a resumed run reads as if it had never stopped.
    """

    def __init__(self, out_dir: str, *, enabled: bool = True, tensorboard: bool = True,
                 resume_step: Optional[int] = None):
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self.enabled = enabled
        self._tb = None
        if not enabled:
            return
        os.makedirs(out_dir, exist_ok=True)
        if resume_step is not None and os.path.exists(self.path):
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
            with open(self.path, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r) + "\n" for r in kept)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(os.path.join(out_dir, "tensorboard"))
            except ImportError:  # tensorboard not installed: JSONL only
                self._tb = None

    def log(self, step: int, values: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: (float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v)
                                for k, v in values.items()}}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, float):
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str) -> List[Dict[str, Any]]:
    """Rows of a metrics JSONL file (a torn last line from a crash is skipped)."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows
