"""RolloutBatch + rewards -> per-token advantages (SPEC §3, kernel K2)."""
from __future__ import annotations

from typing import Tuple

import torch

import tspo_kernels as tk


def batch_advantages(batch, outcome: torch.Tensor, first_turn: torch.Tensor, *, mode: str = "tspo",
                     norm: str = "group", alpha: float = 0.5, gamma: float = 1.0, eps: float = 1e-6,
                     max_turns: int | None = None, backend: str = "auto") -> Tuple[torch.Tensor, torch.Tensor]:
    """``(token_adv (B, L) float32, turn_adv (B, T) float32)`` for ``batch``.

    Groups are ``batch.group_id`` (one id per prompt uid); turn k's advantage goes on the
    loss-masked tokens of turn k.  ``max_turns``: the rollout's turn limit + 1 (the forced
    answer turn), which avoids a device sync.
    """
    return tk.turn_advantages(outcome, first_turn, batch.num_turns, batch.group_id, batch.turn_id,
                              batch.loss_mask, alpha=alpha, gamma=gamma, mode=mode, norm=norm, eps=eps,
                              max_turns=max_turns, backend=backend)
