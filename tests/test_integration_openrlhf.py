"""OpenRLHF recipe: the advantage step on objects shaped like OpenRLHF's ``Experience``
(OpenRLHF itself is not installed here)."""
from types import SimpleNamespace

import torch

from tspo_fast.integrations.openrlhf import tspo_advantages
from tspo_kernels import reference


def _exp(masks, rewards, index, k):
    return SimpleNamespace(action_mask=torch.tensor(masks, dtype=torch.bool), rewards=torch.tensor(rewards),
                           index=torch.tensor(index), info={"folr_first_turn": torch.tensor(k)})


def test_advantages_match_reference_turn_advantages():
    # two prompts x n=2 samples, split over two experiences; 1 = generated, 0 = observation/padding
    e1 = _exp([[1, 1, 0, 0, 1, 1, 0], [1, 1, 1, 0, 0, 0, 0]], [0.0, 1.0], [0, 1], [1, -1])
    e2 = _exp([[1, 0, 0, 1, 0, 0, 0], [1, 1, 0, 1, 1, 0, 1]], [0.0, 0.0], [2, 3], [0, -1])
    owner = SimpleNamespace(strategy=SimpleNamespace(args=SimpleNamespace(rollout=SimpleNamespace(n_samples_per_prompt=2))))
    tspo_advantages(owner, [e1, e2])
    R = torch.tensor([0.0, 1.0, 0.0, 0.0])
    ks = torch.tensor([1, -1, 0, -1])
    K = torch.tensor([2, 1, 2, 3])
    _, A = reference.turn_advantages(R, ks, K, torch.tensor([0, 0, 1, 1]), torch.full((4, 1), -1), torch.zeros(4, 1, dtype=torch.bool))
    # row 0 of e1: turn 0 = tokens 0-3, turn 1 = tokens 4-6; advantages only on generated tokens
    assert torch.allclose(e1.advantages[0], torch.tensor([A[0, 0], A[0, 0], 0, 0, A[0, 1], A[0, 1], 0]))
    assert torch.allclose(e2.advantages[1], torch.tensor([A[3, 0], A[3, 0], 0, A[3, 1], A[3, 1], 0, A[3, 2]]))
    assert e1.kl is None and torch.equal(e1.returns, e1.advantages)
    assert A[2, 0] > 0 > A[3, 0]   # the all-failed group 1 still has signal: FOLR found the answer in row 2
