"""K3's settings and reports as typed values: what the loss computes (:class:`LossOptions`), how
the gradient-filtered path filters (:class:`FilterOptions`) and what it reports
(:class:`FilterStats`).  The public functions build and validate them from their keyword
arguments (``tspo_kernels.pg_loss``); every other module of the package takes them as given.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional, Tuple

import torch

__all__ = ["FilterOptions", "FilterStats", "LossOptions"]

#: 16-bit floating dtypes (their products accumulate the weight gradient in float32)
HALF = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class LossOptions:
    """The per-token objective of docs/algorithm.md §4 (validated by ``fused_linear_pg_loss``)."""

    eps_low: float = 0.2                 # PPO clip: ratio >= 1 - eps_low
    eps_high: float = 0.2                # PPO clip: ratio <= 1 + eps_high
    dual_clip: Optional[float] = None    # dual clip c > 1 for negative advantages; None: off
    beta: float = 0.0                    # weight of the k3 KL to the reference policy
    kl_clamp: float = 10.0               # upper clamp of the k3 KL (its gradient is 0 above it)
    entropy_coef: float = 0.0            # objective -= entropy_coef * entropy
    tis_cap: Optional[float] = None      # truncated importance sampling cap; None: off
    temperature: float = 1.0             # logits / temperature before the softmax
    has_ref: bool = False                # ref_logp given (a metric only when beta = 0)

    @property
    def inv_temp(self) -> float:
        return 1.0 / self.temperature


@dataclass(frozen=True)
class FilterOptions:
    """The gradient-filtered path's settings (``backward="filtered"``; the package docstring
    gives the rule and the error bound they set)."""

    threshold: float                     # tau: an entry may be dropped when its bound <= tau (|g_lp| + |g_ent|)
    row_bound: float                     # rho: a row drops at most rho (|g_lp| + |g_ent|) / T in all, per product
    dense_above: float                   # a chunk keeping more than this share of tiles runs the dense products
    order: Optional[torch.Tensor]        # vocabulary permutation the tiles follow (None: as is)
    tiles_dh: Tuple[int, int]            # (token rows, vocabulary columns) of grad_hidden's skip tiles
    tiles_dw: Tuple[int, int]            # (token rows, vocabulary columns) of grad_weight's skip tiles
    block_h: int                         # hidden columns per program of the block-sparse products
    collect_stats: bool = False          # fill :class:`FilterStats` (a few elementwise passes per chunk)

    @property
    def unit(self) -> int:
        """Vocabulary columns of one unit (the granularity of the stored maxima)."""
        return self.tiles_dh[1]

    @property
    def row_unit(self) -> int:
        """Token rows of one row unit (grad_weight's tile height)."""
        return self.tiles_dw[0]


@dataclass(frozen=True)
class FilterStats:
    """What one ``backward="filtered"`` call skipped and the bounds on what it dropped
    (``PGLossOutput.filter_stats`` with ``filter_stats=True``).  Tensors are 0-dim (on the
    inputs' device: reading them is a device sync, left to the caller)."""

    skipped_dh: torch.Tensor             # share of grad_hidden's tiles skipped
    skipped_dw: torch.Tensor             # share of grad_weight's tiles skipped
    skipped_fraction: torch.Tensor       # mean of the two
    tiles_dh: int                        # tiles of grad_hidden's product over all chunks
    tiles_dw: int                        # tiles of grad_weight's product over all chunks
    dropped_l1_bound_dh: torch.Tensor    # >= sum |dropped d loss / d logits| of grad_hidden's product
    dropped_l1_bound_dw: torch.Tensor    # the same for grad_weight's product
    row_scale_l1: torch.Tensor           # sum over loss rows of (|g_lp| + |g_ent|) / T (the bounds' scale)
    rows_lowered: torch.Tensor           # rows whose threshold the row bound lowered (they keep more)
    threshold: float
    row_bound: float
    dense_above: float
    vocab_ordered: bool
    tiles: dict                          # {"dh": (rows, cols), "dw": (rows, cols)}
    dense_chunks: int                    # chunks that ran the dense products (filter_dense_above)
    chunks: int

    def as_dict(self) -> dict:
        """The fields as a plain dict (the tensors as they are)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}
