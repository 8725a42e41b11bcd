"""Turn segmentation from the masks RL frameworks already keep (torch only).

Frameworks mark, per response token, whether the policy generated it (TRL: ``tool_mask`` = 1,
or ``env_mask`` from a ``rollout_func``; veRL: ``response_mask`` = 1) or the environment
appended it (tool / retrieval output: 0).  TSPO needs per-token turn ids: turn k is the k-th
run of generated tokens together with the observation run that follows it (docs/algorithm.md §1).
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class Turns(NamedTuple):
    """``turn_id`` (B, L) int64: turn k on the tokens of turn k, -1 on padding and on
    observation tokens before the first action; ``is_obs`` (B, L) bool: observation tokens;
    ``num_turns`` (B,) int64: number of action runs (0 for a row without generated tokens)."""

    turn_id: torch.Tensor
    is_obs: torch.Tensor
    num_turns: torch.Tensor


def turns_from_action_mask(action_mask: torch.Tensor, valid_mask: torch.Tensor | None = None) -> Turns:
    """Turn ids of response tokens from a (B, L) action mask.

    action_mask (B, L) bool/int: 1 on policy-generated tokens, 0 on observation tokens and
    padding.  valid_mask (B, L) bool/int, optional: 1 on every real response token (generated
    or observation), 0 on padding; without it, the zeros after a row's last action run are
    treated as padding and the zeros between action runs as observations.
    """
    if not isinstance(action_mask, torch.Tensor) or action_mask.dim() != 2:
        raise ValueError(f"action_mask must be a (B, L) tensor, got {getattr(action_mask, 'shape', type(action_mask))}")
    act = action_mask.bool()
    if valid_mask is None:
        # a token is valid up to (and including) the row's last action token
        pos = torch.arange(act.shape[1], device=act.device)
        last = torch.where(act, pos, torch.full_like(pos, -1)).max(1, keepdim=True).values if act.shape[1] else None
        valid = pos[None] <= last if last is not None else act
    else:
        if tuple(valid_mask.shape) != tuple(act.shape):
            raise ValueError(f"valid_mask has shape {tuple(valid_mask.shape)}; expected {tuple(act.shape)}")
        valid = valid_mask.bool()
        act = act & valid
    prev_act = torch.zeros_like(act)
    prev_act[:, 1:] = act[:, :-1]
    start = act & ~prev_act                          # first token of each action run
    turn = start.long().cumsum(1) - 1
    turn_id = torch.where(valid, turn, torch.full_like(turn, -1))
    is_obs = valid & ~act & (turn_id >= 0)
    return Turns(turn_id, is_obs, start.long().sum(1))
