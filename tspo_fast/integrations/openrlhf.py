"""OpenRLHF: TSPO turn-level advantages for its experience maker (torch + tspo_kernels only).

Written against OpenRLHF 0.11.2: its ``Experience`` (``action_mask`` (b, T-1): 1 on the tokens
of each action range, 0 on prompt, environment feedback and padding; ``rewards`` (b,);
``index``: sample indices, consecutive ``n_samples_per_prompt`` per prompt; ``info``: per-sample
tensors, including the agent's ``extra_logs``) and ``args.rollout.n_samples_per_prompt``.  Your
multi-turn agent (``--train.agent_func_path``, an ``AgentInstanceBase``) reports FOLR's
first-occurrence turn as ``extra_logs={"folr_first_turn": k}`` (the first turn whose
environment feedback contains a gold alias; -1 if none) in every ``step`` result: OpenRLHF keeps
the last step's ``extra_logs``.

    from openrlhf.trainer.ppo_utils.experience_maker import RemoteExperienceMaker
    from tspo_fast.integrations.openrlhf import tspo_advantages
    RemoteExperienceMaker.compute_advantages_and_returns = tspo_advantages

Tested with the real package's ``Experience`` and its sample builder
(tests/test_integration_openrlhf.py); ``RemoteExperienceMaker`` itself does not import on a
machine without flash-attn (see that test's skip reason).
"""
from __future__ import annotations

from typing import List, Sequence

import torch

import tspo_kernels as tk

from .segments import turns_from_action_mask


def experience_advantages(experiences: Sequence, n_samples_per_prompt: int, *, alpha: float = 0.5,
                          gamma: float = 1.0, norm: str = "group") -> List[torch.Tensor]:
    """Per experience, (b, L) float32 TSPO advantages on its action tokens (0 elsewhere).

    Groups are the ``n_samples_per_prompt`` consecutive sample indices of one prompt.
    """
    turns = [turns_from_action_mask(e.action_mask) for e in experiences]
    cat = lambda xs: torch.cat([torch.as_tensor(x).reshape(-1) for x in xs])
    outcome = cat([e.rewards for e in experiences]).float()
    k_star = cat([e.info["folr_first_turn"] for e in experiences]).long()
    num_turns = cat([t.num_turns for t in turns]).long()
    groups = cat([e.index for e in experiences]).long() // n_samples_per_prompt
    none = torch.full((len(outcome), 1), -1, dtype=torch.long)           # per-turn values only
    _, turn_adv = tk.turn_advantages(outcome, k_star, num_turns, groups, none, none >= 0, alpha=alpha, gamma=gamma,
                                     norm=norm, max_turns=max(int(num_turns.max()), 1) if len(outcome) else 1)
    out = []
    for e, t, a in zip(experiences, turns, turn_adv.split([len(t.num_turns) for t in turns])):
        on = e.action_mask.bool() & (t.turn_id >= 0)
        out.append(torch.where(on, a.gather(1, t.turn_id.clamp(min=0, max=a.shape[1] - 1)), torch.zeros(())))
    return out


def tspo_advantages(self, experiences, *args, **kwargs):
    """Drop-in for ``RemoteExperienceMaker.compute_advantages_and_returns``: sets
    ``advantages`` and ``returns`` of each experience; KL goes in the loss (``e.kl = None``)."""
    n = self.strategy.args.rollout.n_samples_per_prompt
    for e, adv in zip(experiences, experience_advantages(experiences, n)):
        e.advantages = e.returns = adv
        e.kl = None
    return experiences
