"""Step metrics and their log: one JSON object per line (``metrics.jsonl``) and TensorBoard scalars."""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional

import torch
from torch.utils.tensorboard import SummaryWriter

__all__ = ["MetricsLogger", "read_metrics", "step_metrics", "all_fail_fraction"]


def all_fail_fraction(outcome: torch.Tensor, group_id: torch.Tensor) -> float:
    """Share of groups whose every rollout scored 0: where GRPO has no signal and FOLR may."""
    groups = torch.unique(group_id)
    if groups.numel() == 0:
        return 0.0
    fails = sum(bool((outcome[group_id == g] <= 0).all()) for g in groups)
    return fails / groups.numel()


def step_metrics(batch, outcome: torch.Tensor, first_turn: torch.Tensor, token_adv: torch.Tensor,
                 turn_adv: torch.Tensor, upd, times: Dict[str, float], *, outcome_kind: str = "em",
                 plan=None) -> Dict[str, float]:
    """The per-step metrics of README's list, from a step's batch, rewards, advantages and update."""
    gen_tokens = float(batch.loss_mask.sum())
    adv_on_tokens = token_adv[batch.loss_mask]
    valid_turns = turn_adv[torch.arange(turn_adv.shape[1])[None] < batch.num_turns[:, None].long()]
    m = {
        "reward/mean": float(outcome.mean()),
        "reward/folr_hit": float((first_turn >= 0).float().mean()),
        "reward/all_fail_groups": all_fail_fraction(outcome, batch.group_id),
        "rollout/turns": float(batch.num_turns.float().mean()),
        "rollout/searches": float(batch.num_searches.float().mean()),
        "rollout/truncated": float(batch.truncated.float().mean()),
        "rollout/response_tokens": float(batch.response_lengths().float().mean()),
        "advantage/std": float(valid_turns.std()) if valid_turns.numel() > 1 else 0.0,
        "advantage/token_abs_mean": float(adv_on_tokens.abs().mean()) if adv_on_tokens.numel() else 0.0,
        "loss/pg": upd.loss, "loss/kl": upd.kl, "loss/entropy": upd.entropy, "loss/clip_frac": upd.clip_frac,
        "train/grad_norm": upd.grad_norm, "train/tokens_per_s": gen_tokens / max(times["time/step"], 1e-9),
        **times,
    }
    for k, v in getattr(upd, "mismatch", {}).items():       # rollout engine vs trainer log-probs
        m[f"mismatch/{k}"] = v
    if plan is not None:                                     # what the update ran through the model
        m["train/micro_batches"] = float(len(plan.micro()))
        m["train/padding_frac"] = 1.0 - plan.tokens / max(plan.slots, 1)
    if outcome_kind == "em":
        m["reward/em"] = m["reward/mean"]
    return m


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
            self._tb = SummaryWriter(os.path.join(out_dir, "tensorboard"))

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
