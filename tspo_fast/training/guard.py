"""The divergence guard: after each step, decide whether training may go on.

A step is *healthy* when every ``loss/*`` metric and ``train/grad_norm`` are finite and DeepSpeed
applied every optimizer step of it.  The guard stops the run (:class:`DivergenceError`, naming the
step and the likely config fields) when

* a loss is non-finite (the current weights give NaN/inf on this batch);
* the grad norm is non-finite on a step DeepSpeed applied (the weights took a non-finite update);
* ``train.max_skipped_steps`` consecutive steps had an optimizer step skipped (DeepSpeed skips a
  step whose gradients are non-finite: "OVERFLOW! Skipping step"; the weights did not move).

The trainer writes no checkpoint for an unhealthy step, so nothing broken is saved over
something good (docs/reliability.md).
"""
from __future__ import annotations

import math
import numbers
from typing import Dict, Optional

from ..config import Config

__all__ = ["DivergenceError", "DivergenceGuard"]


class DivergenceError(RuntimeError):
    """Training diverged; the message names the step, what was non-finite and the likely fields."""


class DivergenceGuard:
    """Keeps the count of consecutive overflow-skipped steps and the last healthy step."""

    def __init__(self, cfg: Config, start_step: int = 0):
        self.cfg = cfg
        self.max_skipped = cfg.train.max_skipped_steps
        self.skipped_in_a_row = 0
        self.last_healthy_step: Optional[int] = start_step if start_step > 0 else None
        self.last_finite_grad_norm: Optional[float] = None

    def check(self, step: int, metrics: Dict[str, float], *, skipped: int = 0) -> bool:
        """True when ``step`` was healthy; False for a tolerated overflow-skipped step; raises
        :class:`DivergenceError` when the run must stop.  ``skipped``: optimizer steps DeepSpeed
        skipped during this step."""
        bad = sorted(k for k, v in metrics.items() if k.startswith("loss/") and isinstance(v, numbers.Real)
                     and not math.isfinite(float(v)))
        if bad:
            raise DivergenceError(self._message(step, f"{bad[0]} is {metrics[bad[0]]}"))
        gn = metrics.get("train/grad_norm")
        finite_gn = gn is None or math.isfinite(float(gn))
        if skipped:
            self.skipped_in_a_row += 1
            if self.skipped_in_a_row >= self.max_skipped:
                raise DivergenceError(self._message(
                    step, f"{self.skipped_in_a_row} consecutive step(s) with an optimizer step skipped for non-finite "
                          f"gradients (train/grad_norm {gn}; train.max_skipped_steps is {self.max_skipped})"))
            return False
        if not finite_gn:
            raise DivergenceError(self._message(step, f"train/grad_norm is {gn} and the optimizer step was applied"))
        self.skipped_in_a_row = 0
        self.last_healthy_step = step
        self.last_finite_grad_norm = gn
        return True

    def _message(self, step: int, what: str) -> str:
        t, m = self.cfg.train, self.cfg.model
        likely = [f"train.lr={t.lr:g}" + (" is unusually high (Search-R1 uses 1e-6, the embedded default 3e-4)"
                                           if t.lr > 1e-3 else " (lower it)")]
        if m.dtype != "float32":
            likely.append(f"model.dtype={m.dtype}" + ("" if t.bf16 else " without train.bf16: true (optimizer "
                                                                        "states in bf16)") + " (try float32)")
        if not t.grad_clip:
            likely.append("train.grad_clip=0 (no clipping)")
        since = (f"the last healthy step was {self.last_healthy_step}" + (
            f" (grad norm {self.last_finite_grad_norm:.4g})" if self.last_finite_grad_norm is not None else "")
                 if self.last_healthy_step is not None else "no step of this run was healthy")
        return f"training diverged at step {step}: {what}; {since}; likely field: {'; '.join(likely)}"
