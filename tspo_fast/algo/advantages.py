"""RolloutBatch + rewards -> per-token advantages (docs/algorithm.md §3), through a registry of
estimators (``advantage.mode`` in a config).

An estimator is a function::

    estimator(batch, outcome, first_turn, settings: AdvantageSettings)
        -> (token_adv (B, L) float32, turn_adv (B, T) float32)

``batch`` is a :class:`~tspo_fast.env.batch.RolloutBatch` (groups: ``batch.group_id``; turns:
``batch.turn_id``; trained tokens: ``batch.loss_mask``), ``outcome`` (B,) the rewards R and
``first_turn`` (B,) FOLR's k* (-1: none).  ``settings`` carries the ``advantage`` section
(``mode``, ``norm``, ``gamma``, ``eps``, ``options``), FOLR's ``alpha`` (``reward.folr_alpha``),
``max_turns`` and the step's own ``seed`` (the run's seed mixed with the step: what a
randomised estimator such as ``tspo_placebo`` draws from).  The built-in estimators run kernel
K2 and take no options.  A plugin is named by its path in the config
(``advantage.mode: my_pkg.rules:my_rule``; docs/extending.md).
"""
from __future__ import annotations

import types
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Tuple

import torch

import tspo_kernels as tk

from ..registry import Registry

__all__ = ["ESTIMATORS", "AdvantageSettings", "Estimator", "batch_advantages", "kernel_estimator"]


@dataclass(frozen=True)
class AdvantageSettings:
    """What an estimator is called with besides the batch (the ``advantage`` section and the step).

    mode, norm, gamma, eps, options: ``advantage.*``; alpha: ``reward.folr_alpha``; max_turns:
    the rollout's turn limit + 1 (the forced answer turn; None: read off the batch, a device
    sync); backend: K2's backend; seed: the step's seed; options: a read-only mapping.
    """

    mode: str = "tspo"
    alpha: float = 0.5
    gamma: float = 1.0
    norm: str = "group"
    eps: float = 1e-6
    max_turns: Optional[int] = None
    backend: str = "auto"
    seed: int = 0
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "options", types.MappingProxyType(dict(self.options)))

    @classmethod
    def from_config(cls, cfg, *, seed: int = 0, backend: str = "auto") -> "AdvantageSettings":
        """From a run's ``Config`` (its ``advantage`` section, ``reward.folr_alpha``,
        ``rollout.max_turns``) and the step's ``seed``."""
        a = cfg.advantage
        return cls(mode=a.mode, alpha=cfg.reward.folr_alpha, gamma=a.gamma, norm=a.norm, eps=a.eps,
                   max_turns=cfg.rollout.max_turns + 1, backend=backend, seed=seed, options=a.options)


Estimator = Callable[[Any, torch.Tensor, torch.Tensor, AdvantageSettings], Tuple[torch.Tensor, torch.Tensor]]


def kernel_estimator(mode: str) -> Estimator:
    """The K2 estimator of ``mode`` (one of :data:`tspo_kernels.ADV_MODES`)."""

    def estimator(batch, outcome, first_turn, settings: AdvantageSettings):
        s = settings
        return tk.turn_advantages(outcome, first_turn, batch.num_turns, batch.group_id, batch.turn_id,
                                  batch.loss_mask, alpha=s.alpha, gamma=s.gamma, mode=mode, norm=s.norm, eps=s.eps,
                                  max_turns=s.max_turns, backend=s.backend, seed=s.seed)

    estimator.__name__ = f"k2_{mode}"
    estimator.__doc__ = f"K2 ``mode={mode!r}`` (docs/algorithm.md §3)."
    return estimator


#: ``advantage.mode`` -> estimator (the K2 modes, which take no ``advantage.options``)
ESTIMATORS: Registry[Estimator] = Registry(
    "advantage.mode", {m: kernel_estimator(m) for m in tk.ADV_MODES}, role="estimator",
    call=("batch", "outcome", "first_turn", "settings"), options={m: () for m in tk.ADV_MODES})


def batch_advantages(batch, outcome: torch.Tensor, first_turn: torch.Tensor,
                     settings: AdvantageSettings = AdvantageSettings()) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(token_adv (B, L) float32, turn_adv (B, T) float32)`` for ``batch`` by the estimator
    ``settings.mode`` (a registered name or a plugin path), its options checked first."""
    ESTIMATORS.check(settings.mode, settings.options)
    return ESTIMATORS.get(settings.mode)(batch, outcome, first_turn, settings)
