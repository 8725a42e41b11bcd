"""TSPO as a veRL advantage estimator (tspo_fast.integrations.verl), without veRL installed.

veRL pins GPU packages, so it is not installed here: the estimator is called the way veRL's
``compute_advantage`` calls a registered estimator (keyword tensors shaped like veRL's batch,
``index`` = numpy array of uid strings) and checked against ``tspo_kernels.reference``.  The
registration path is checked with a stand-in ``verl.trainer.ppo.core_algos`` module that has
veRL's ``register_adv_est`` / ``get_adv_estimator_fn`` contract.
"""
import asyncio
import importlib
import pickle
import sys
import types

import numpy as np
import pytest
import torch

from tspo_fast.integrations import verl as tv
from tspo_fast.integrations.segments import turns_from_action_mask
from tspo_kernels import reference


def verl_batch(seed, groups=5, n=4, L=48, alpha=0.5):
    """Random multi-turn rows: response_mask runs (policy) separated by observation zeros, then
    right padding; R in {0, 1} or fractional; k* anywhere in [-1, K-1]."""
    g = torch.Generator().manual_seed(seed)
    B = groups * n
    mask = torch.zeros(B, L, dtype=torch.long)
    valid = torch.zeros(B, L, dtype=torch.long)
    K = torch.zeros(B, dtype=torch.long)
    for b in range(B):
        t, turns = 0, int(torch.randint(0, 5, (1,), generator=g))
        for k in range(turns):
            a = int(torch.randint(1, 5, (1,), generator=g))
            o = int(torch.randint(1, 5, (1,), generator=g)) if k < turns - 1 else 0
            if t + a + o > L:
                break
            mask[b, t:t + a] = 1
            valid[b, t:t + a + o] = 1
            t += a + o
            K[b] += 1
    outcome = torch.where(torch.rand(B, generator=g) < 0.5, torch.ones(B), torch.rand(B, generator=g).round(decimals=2))
    first = torch.where(K > 0, (torch.rand(B, generator=g) * (K + 1)).long() - 1, torch.full_like(K, -1))
    uids = np.array([f"uid-{b // n}-{seed}" for b in range(B)], dtype=object)
    return mask, valid, outcome, first, K, uids


@pytest.mark.parametrize("norm", ["group", "turn"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_estimator_matches_reference(seed, norm):
    alpha = 0.5
    mask, valid, outcome, first, K, uids = verl_batch(seed, alpha=alpha)
    rewards = tv.folr_token_level_rewards(outcome, first, mask, alpha=alpha)
    assert rewards.shape == mask.shape and rewards.dtype == torch.float32
    est = tv.make_tspo_estimator(alpha=alpha, norm=norm)
    adv, returns = est(token_level_rewards=rewards, response_mask=mask, index=uids, config=None)

    seg = turns_from_action_mask(mask)
    assert torch.equal(seg.num_turns, K)
    groups = torch.tensor([int(u.split("-")[1]) for u in uids])
    want, _ = reference.turn_advantages(outcome, first, K, groups, seg.turn_id, mask.bool(), alpha=alpha, norm=norm)
    assert adv.shape == mask.shape and adv.dtype == torch.float32
    assert torch.allclose(adv, want, atol=1e-5), float((adv - want).abs().max())
    assert torch.equal(returns, adv)
    assert not adv[mask == 0].any()
    assert (adv[mask == 1] != 0).any()


def test_outcome_only_rewards_and_trailing_observation_reward():
    """veRL's default reward (score on the last valid token, possibly an observation token)
    reads as the outcome of the last turn, with no FOLR hit."""
    mask = torch.tensor([[1, 1, 0, 0, 1, 0, 0], [1, 0, 0, 0, 0, 0, 0], [1, 1, 1, 0, 1, 1, 0], [1, 0, 1, 0, 0, 0, 0]])
    last_valid = torch.tensor([5, 0, 5, 3])            # row 0 and row 3 end on observation tokens
    scores = torch.tensor([1.0, 0.0, 0.0, 1.0])
    rewards = torch.zeros(4, 7)
    rewards[torch.arange(4), last_valid] = scores
    adv, _ = tv.compute_tspo_advantage(rewards, mask, ["a", "a", "b", "b"])
    seg = turns_from_action_mask(mask)
    want, _ = reference.turn_advantages(scores, torch.full((4,), -1), seg.num_turns, torch.tensor([0, 0, 1, 1]),
                                        seg.turn_id, mask.bool())
    assert torch.allclose(adv, want)


def test_bad_rewards_raise_clear_errors():
    mask = torch.tensor([[1, 0, 1, 0, 1]])
    with pytest.raises(ValueError, match="alpha"):
        tv.compute_tspo_advantage(torch.tensor([[0.3, 0, 0, 0, 1.0]]), mask, ["u"])
    with pytest.raises(ValueError, match="index"):
        tv.compute_tspo_advantage(torch.zeros(1, 5), mask, ["u", "v"])
    with pytest.raises(ValueError, match="uids"):
        tv.make_tspo_estimator()(token_level_rewards=torch.zeros(1, 5), response_mask=mask)


class CharTokenizer:
    """One token per character (id = code point); enough for K1 and decoding."""

    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids if i > 0)


# (text, policy token?) segments of three responses; gold answer "Paris"
ROWS = [[("<search>q</search>", 1), ("<information>Rome only</information>", 0),
         ("<search>r</search>", 1), ("<information>it is Paris</information>", 0), ("<answer>Paris</answer>", 1)],
        [("<answer>Paris</answer>", 1)],
        [("<search>q</search>", 1), ("<information>paris, France</information>", 0), ("<answer>y</answer>", 1)]]


def response_tensors(rows=ROWS, pad=3):
    """(ids, response_mask, valid) (bs, L) as veRL keeps them: right-padded with 0."""
    tok = CharTokenizer()
    L = max(sum(len(t) for t, _ in r) for r in rows) + pad
    ids, mask, valid = (torch.zeros(len(rows), L, dtype=torch.long) for _ in range(3))
    for b, r in enumerate(rows):
        t = 0
        for text, is_act in r:
            ids[b, t:t + len(text)] = torch.tensor(tok.encode(text))
            mask[b, t:t + len(text)] = is_act
            valid[b, t:t + len(text)] = 1
            t += len(text)
    return ids, mask, valid


def test_folr_first_turn_from_token_ids():
    """K1 on a veRL response, one token per character."""
    ids, mask, _ = response_tensors()
    tok = CharTokenizer()
    assert tv.folr_first_turn(ids, mask, [["Paris"]] * 3, tok).tolist() == [1, -1, 0]
    assert tv.folr_first_turn(ids, mask, [["Paris"]] * 3, tok, source="action").tolist() == [2, 0, -1]


def test_reward_manager_feeds_the_estimator():
    """TSPORewardManager on a DataProto-shaped batch -> token_level_rewards -> "tspo" estimator
    equals the reference on the scripted (R, k*, K)."""
    ids, mask, valid = response_tensors()
    prompt = torch.ones(3, 4, dtype=torch.long)
    data = types.SimpleNamespace(
        batch={"responses": ids, "response_mask": mask, "attention_mask": torch.cat([prompt, valid], 1)},
        non_tensor_batch={"reward_model": np.array([{"ground_truth": {"target": np.array(["Paris"])}}] * 3),
                          "data_source": np.array(["nq"] * 3, dtype=object)})
    manager = tv.TSPORewardManager(CharTokenizer(), alpha=0.5)
    out = manager(data, return_dict=True)
    outcome, first = torch.tensor([1.0, 1.0, 0.0]), torch.tensor([1, -1, 0])
    assert out["reward_extra_info"]["outcome"] == outcome.tolist()
    assert out["reward_extra_info"]["folr_first_turn"] == first.tolist()
    assert torch.equal(out["reward_tensor"], tv.folr_token_level_rewards(outcome, first, mask, 0.5))
    scored = tv.TSPORewardManager(CharTokenizer(), compute_score=lambda **kw: {"score": 0.25})(data)
    assert torch.allclose(scored, tv.folr_token_level_rewards(torch.full((3,), 0.25), first, mask, 0.5))

    uids = np.array(["q0", "q0", "q0"], dtype=object)
    adv, _ = tv.make_tspo_estimator(alpha=0.5)(token_level_rewards=out["reward_tensor"], response_mask=mask,
                                                index=uids)
    seg = turns_from_action_mask(mask)
    want, _ = reference.turn_advantages(outcome, first, seg.num_turns, torch.zeros(3, dtype=torch.long),
                                        seg.turn_id, mask.bool())
    assert torch.allclose(adv, want, atol=1e-6)


class FakeDataProto:
    """What the adapters read of veRL's DataProto: ``batch`` (tensors), ``non_tensor_batch``
    (numpy object arrays), slicing and item access."""

    def __init__(self, batch, non_tensor_batch):
        self.batch, self.non_tensor_batch = batch, non_tensor_batch

    def __len__(self):
        return len(self.batch["responses"])

    def __getitem__(self, i):
        if isinstance(i, slice):
            return FakeDataProto({k: v[i] for k, v in self.batch.items()},
                                 {k: v[i] for k, v in self.non_tensor_batch.items()})
        return types.SimpleNamespace(batch={k: v[i] for k, v in self.batch.items()},
                                     non_tensor_batch={k: v[i] for k, v in self.non_tensor_batch.items()})


def fake_data():
    ids, mask, valid = response_tensors()
    prompt = torch.ones(3, 4, dtype=torch.long)
    return FakeDataProto({"prompts": prompt, "responses": ids, "response_mask": mask,
                          "attention_mask": torch.cat([prompt, valid], 1)},
                         {"reward_model": np.array([{"ground_truth": {"target": np.array(["Paris"])}}] * 3),
                          "data_source": np.array(["nq"] * 3, dtype=object)}), mask


def test_reward_loop_scores_assemble_into_folr_rewards():
    data, mask = fake_data()
    tok = CharTokenizer()
    ks = [tv.item_first_turn(data[i:i + 1][0], tok) for i in range(3)]
    assert ks == [1, -1, 0]
    got = tv.folr_rm_scores(data, [tv.FolrScore(1.0, 1), 1.0, (0.0, 0)], alpha=0.5)
    assert torch.equal(got, tv.folr_token_level_rewards(torch.tensor([1.0, 1.0, 0.0]), torch.tensor([1, -1, 0]),
                                                        mask, 0.5))
    with pytest.raises(ValueError, match="scores"):
        tv.folr_rm_scores(data, [1.0], alpha=0.5)


def test_registers_with_verl_when_importable(monkeypatch):
    """With veRL importable, importing the module registers the "tspo" estimator (register_adv_est)
    and the "tspo" reward managers (reward loop and legacy registries), with veRL's contracts."""
    registry = {}

    def register_adv_est(name):
        def deco(fn):
            if name in registry and registry[name] is not fn:
                raise ValueError(f"{name} already registered")
            registry[name] = fn
            return fn
        return deco

    core = types.ModuleType("verl.trainer.ppo.core_algos")
    core.ADV_ESTIMATOR_REGISTRY = registry
    core.register_adv_est = register_adv_est
    loop_registry = {}
    loop = types.ModuleType("verl.experimental.reward_loop.reward_manager")
    loop.register = lambda name: lambda cls: loop_registry.setdefault(name, cls)
    naive = types.ModuleType("verl.experimental.reward_loop.reward_manager.naive")

    class NaiveRewardManager:                       # veRL's: compute_score on the decoded response
        def __init__(self, tokenizer):
            self.tokenizer = tokenizer

        async def run_single(self, data):
            return {"reward_score": 1.0, "reward_extra_info": {"acc": 1.0}}

    naive.NaiveRewardManager = NaiveRewardManager
    for name in ("verl.experimental", "verl.experimental.reward_loop"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "verl.experimental.reward_loop.reward_manager", loop)
    monkeypatch.setitem(sys.modules, "verl.experimental.reward_loop.reward_manager.naive", naive)
    managers = types.ModuleType("verl.workers.reward_manager.registry")
    managers.REWARD_MANAGER_REGISTRY = {}
    managers.register = lambda name: lambda cls: managers.REWARD_MANAGER_REGISTRY.setdefault(name, cls)
    for name in ("verl", "verl.trainer", "verl.trainer.ppo", "verl.workers", "verl.workers.reward_manager"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    sys.modules["verl.workers.reward_manager"].registry = managers
    monkeypatch.setitem(sys.modules, "verl.trainer.ppo.core_algos", core)
    monkeypatch.setitem(sys.modules, "verl.workers.reward_manager.registry", managers)
    mod = importlib.reload(tv)
    try:
        assert "tspo" in registry
        assert managers.REWARD_MANAGER_REGISTRY["tspo"] is mod.TSPORewardManager
        loop_cls = loop_registry["tspo"]
        assert loop_cls is mod.TSPORewardLoopManager and issubclass(loop_cls, NaiveRewardManager)
        data, mask = fake_data()
        out = asyncio.run(loop_cls(CharTokenizer()).run_single(data[0:1]))
        assert out["reward_score"] == 1.0 and out["reward_score"].first_turn == 1
        assert out["reward_extra_info"] == {"acc": 1.0, "folr_first_turn": 1}
        assert torch.tensor([out["reward_score"]]).tolist() == [1.0]      # veRL's own placement still works
        assert pickle.loads(pickle.dumps(out["reward_score"])).first_turn == 1
        scores = [asyncio.run(loop_cls(CharTokenizer()).run_single(data[i:i + 1]))["reward_score"] for i in range(3)]
        assert torch.equal(loop_cls.assemble_rm_scores(data, scores),
                           tv.folr_token_level_rewards(torch.ones(3), torch.tensor([1, -1, 0]), mask, 0.5))
        mask = torch.tensor([[1, 1, 0, 1, 0], [1, 0, 0, 0, 0]])
        rewards = mod.folr_token_level_rewards(torch.tensor([1.0, 0.0]), torch.tensor([0, -1]), mask)
        adv, _ = registry["tspo"](token_level_rewards=rewards, response_mask=mask, index=np.array(["p", "p"]),
                                  config=object())
        assert adv[0, 0] > 0 > adv[1, 0]
        mod.register_tspo_estimator("tspo_turn", norm="turn")
        assert "tspo_turn" in registry
    finally:
        monkeypatch.undo()
        importlib.reload(tv)


_BLOCKED_IMPORT = r"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("transformers", "trl", "verl", "deepspeed", "vllm", "datasets", "tokenizers"):
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
import tspo_kernels, tspo_fast.integrations.verl, tspo_fast.integrations.segments
print("imported")
"""


def test_kernels_and_verl_adapter_import_with_torch_and_triton_only():
    """tspo_kernels and the veRL adapter import with every RL / HF framework unavailable."""
    import subprocess
    p = subprocess.run([sys.executable, "-c", _BLOCKED_IMPORT], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "imported" in p.stdout, p.stderr[-2000:]
