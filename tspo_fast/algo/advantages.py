"""RolloutBatch + rewards -> per-token advantages (docs/algorithm.md §3), through a registry of
estimators (``advantage.mode`` in a config).

An estimator is a function::

    estimator(batch, outcome, first_turn, *, alpha, gamma, norm, eps, max_turns, backend, seed)
        -> (token_adv (B, L) float32, turn_adv (B, T) float32)

``batch`` is a :class:`~tspo_fast.env.batch.RolloutBatch` (groups: ``batch.group_id``; turns:
``batch.turn_id``; trained tokens: ``batch.loss_mask``), ``outcome`` (B,) the rewards R and
``first_turn`` (B,) FOLR's k* (-1: none); ``alpha`` is ``reward.folr_alpha``, the rest the
``advantage`` section; ``seed`` is the step's own seed (the run's seed mixed with the step: what a
randomised estimator such as ``tspo_placebo`` draws from).  The built-in estimators run kernel K2.
Add one with ``ESTIMATORS.register("name", fn)`` (docs/extending.md).
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

import tspo_kernels as tk

from ..registry import Registry

__all__ = ["ESTIMATORS", "Estimator", "batch_advantages", "kernel_estimator"]

Estimator = Callable[..., Tuple[torch.Tensor, torch.Tensor]]


def kernel_estimator(mode: str) -> Estimator:
    """The K2 estimator of ``mode`` (one of :data:`tspo_kernels.ADV_MODES`)."""

    def estimator(batch, outcome, first_turn, *, alpha: float = 0.5, gamma: float = 1.0, norm: str = "group",
                  eps: float = 1e-6, max_turns: Optional[int] = None, backend: str = "auto", seed: int = 0):
        return tk.turn_advantages(outcome, first_turn, batch.num_turns, batch.group_id, batch.turn_id,
                                  batch.loss_mask, alpha=alpha, gamma=gamma, mode=mode, norm=norm, eps=eps,
                                  max_turns=max_turns, backend=backend, seed=seed)

    estimator.__name__ = f"k2_{mode}"
    estimator.__doc__ = f"K2 ``mode={mode!r}`` (docs/algorithm.md §3)."
    return estimator


#: ``advantage.mode`` -> estimator
ESTIMATORS: Registry[Estimator] = Registry("advantage.mode", {m: kernel_estimator(m) for m in tk.ADV_MODES})


def batch_advantages(batch, outcome: torch.Tensor, first_turn: torch.Tensor, *, mode: str = "tspo",
                     norm: str = "group", alpha: float = 0.5, gamma: float = 1.0, eps: float = 1e-6,
                     max_turns: int | None = None, backend: str = "auto", seed: int = 0
                     ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(token_adv (B, L) float32, turn_adv (B, T) float32)`` for ``batch`` by the estimator ``mode``.

    ``max_turns``: the rollout's turn limit + 1 (the forced answer turn), which avoids a device sync;
    ``seed``: the step's seed (randomised estimators).
    """
    return ESTIMATORS.get(mode)(batch, outcome, first_turn, alpha=alpha, gamma=gamma, norm=norm, eps=eps,
                                max_turns=max_turns, backend=backend, seed=seed)
