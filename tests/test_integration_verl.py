"""TSPO in veRL (tspo_fast.integrations.verl), against veRL 0.9.1 itself.

veRL is installed by ``scripts/install.sh ... dev`` without its dependency pins (``pip install
--no-deps verl==0.9.1`` plus the light packages it imports; its pins would replace this
project's transformers and tensordict).  What runs here, unchanged:

* the ``"tspo"`` advantage estimator through ``core_algos``' registry and
  ``verl.trainer.ppo.ray_trainer.compute_advantage`` on a real ``DataProto``;
* the reward manager through veRL's reward loop: ``RewardLoopManager`` (its Ray workers, on a
  local one-CPU Ray instance) loading ``TSPORewardLoopManager`` with the settings of docs/kernels.md
  (``source=importlib``) on veRL's own default trainer config, then ``compute_rm_score``;
* the legacy ``AbstractRewardManager`` path (``TSPORewardManager``) on a ``DataProto``.

Not run here: veRL's trainer loop (``RayPPOTrainer.fit``), whose actor, rollout and reference
workers need FSDP/Megatron and vLLM/SGLang on CUDA devices.
"""
import os
import pickle
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tspo_fast.integrations import verl as tv
from tspo_fast.integrations.segments import turns_from_action_mask
from tspo_fast.models.tiny import build_tiny_model, load_tokenizer
from tspo_kernels import reference

ROOT = Path(__file__).resolve().parents[1]
NO_VERL = ("veRL is not installed (scripts/install.sh installs verl==0.9.1 with the dev extra: "
           "pip install --no-deps verl==0.9.1, then ray tensordict omegaconf codetiming hydra-core orjson "
           "torchdata peft pybind11 pylatexenc)")


def verl_modules():
    """veRL's modules these tests use; skip (with how to install it) where veRL is missing."""
    pytest.importorskip("verl", reason=NO_VERL)
    from verl import DataProto
    from verl.trainer.config.algorithm import AlgoConfig
    from verl.trainer.ppo import core_algos
    from verl.trainer.ppo.ray_trainer import compute_advantage
    return DataProto, AlgoConfig, core_algos, compute_advantage


def verl_batch(seed, groups=5, n=4, L=48):
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


# ----------------------------------------------------------------------------- the estimator in veRL
@pytest.mark.parametrize("norm", ["group", "turn"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_compute_advantage_runs_the_registered_estimator(seed, norm):
    """veRL's compute_advantage on a DataProto dispatches "tspo" (registered on import) through
    core_algos' registry; the advantages equal the reference turn advantages."""
    DataProto, AlgoConfig, core_algos, compute_advantage = verl_modules()
    name = "tspo" if norm == "group" else "tspo_turn_test"
    if name not in core_algos.ADV_ESTIMATOR_REGISTRY:
        tv.register_tspo_estimator(name, norm="turn")
    assert core_algos.get_adv_estimator_fn("tspo").__name__ == "compute_tspo_advantage"
    alpha = 0.5
    mask, valid, outcome, first, K, uids = verl_batch(seed)
    rewards = tv.folr_token_level_rewards(outcome, first, mask, alpha=alpha)
    B, L = mask.shape
    data = DataProto.from_dict(
        tensors={"responses": torch.zeros(B, L, dtype=torch.long), "response_mask": mask,
                 "attention_mask": torch.cat([torch.ones(B, 3, dtype=torch.long), valid], 1),
                 "token_level_rewards": rewards},
        non_tensors={"uid": uids})
    out = compute_advantage(data, name, config=AlgoConfig(adv_estimator=name))
    adv, returns = out.batch["advantages"], out.batch["returns"]

    seg = turns_from_action_mask(mask)
    assert torch.equal(seg.num_turns, K)
    groups = torch.tensor([int(u.split("-")[1]) for u in uids])
    want, _ = reference.turn_advantages(outcome, first, K, groups, seg.turn_id, mask.bool(), alpha=alpha, norm=norm)
    assert adv.shape == mask.shape and adv.dtype == torch.float32
    assert torch.allclose(adv, want, atol=1e-5), float((adv - want).abs().max())
    assert torch.equal(returns, adv)
    assert not adv[mask == 0].any() and (adv[mask == 1] != 0).any()


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


# ----------------------------------------------------------------------------- rewards: FOLR's k* and R
# (text, policy token?) segments of three responses; gold answer "Paris"; k* = 1, -1, 0; R = 1, 1, 0
ROWS = [[("<search> capital </search>", 1), ("\n<information> Rome only </information>\n", 0),
         ("<search> France </search>", 1), ("\n<information> it is Paris </information>\n", 0),
         ("<answer> Paris </answer>", 1)],
        [("<answer> Paris </answer>", 1)],
        [("<search> q </search>", 1), ("\n<information> Paris, France </information>\n", 0), ("<answer> Lyon </answer>", 1)]]
K_STAR, OUTCOME = [1, -1, 0], [1.0, 1.0, 0.0]


@pytest.fixture(scope="module")
def tiny_tokenizer_dir(tmp_path_factory):
    return build_tiny_model(str(tmp_path_factory.mktemp("verl_tok") / "m"))


def response_tensors(tok, rows=ROWS, pad=3):
    """(ids, response_mask, valid) (bs, L) as veRL keeps them: right-padded."""
    segs = [[(tok.encode(text, add_special_tokens=False), a) for text, a in r] for r in rows]
    L = max(sum(len(ids) for ids, _ in r) for r in segs) + pad
    ids = torch.full((len(rows), L), tok.pad_token_id, dtype=torch.long)
    mask, valid = (torch.zeros(len(rows), L, dtype=torch.long) for _ in range(2))
    for b, r in enumerate(segs):
        t = 0
        for seg, is_act in r:
            ids[b, t:t + len(seg)] = torch.tensor(seg)
            mask[b, t:t + len(seg)] = is_act
            valid[b, t:t + len(seg)] = 1
            t += len(seg)
    return ids, mask, valid


def search_r1_dataproto(tok, DataProto, prompt_len=4):
    """A DataProto as veRL's multi-turn agent loop hands it to the reward loop (Search-R1 rows)."""
    ids, mask, valid = response_tensors(tok)
    B = ids.shape[0]
    prompts = torch.full((B, prompt_len), tok.pad_token_id, dtype=torch.long)
    return DataProto.from_dict(
        tensors={"prompts": prompts, "responses": ids, "response_mask": mask,
                 "input_ids": torch.cat([prompts, ids], 1),
                 "attention_mask": torch.cat([torch.ones(B, prompt_len, dtype=torch.long), valid], 1)},
        non_tensors={"data_source": np.array(["searchR1_nq"] * B, dtype=object),
                     "reward_model": np.array([{"ground_truth": {"target": np.array(["Paris"])}}] * B, dtype=object),
                     "uid": np.array(["q0"] * B, dtype=object)}), mask


def test_folr_first_turn_from_token_ids(tiny_tokenizer_dir):
    """K1 on veRL response tensors, with the policy's BPE tokenizer."""
    tok = load_tokenizer(tiny_tokenizer_dir)
    ids, mask, valid = response_tensors(tok)
    assert tv.folr_first_turn(ids, mask, [["Paris"]] * 3, tok, valid_mask=valid).tolist() == K_STAR
    assert tv.folr_first_turn(ids, mask, [["Paris"]] * 3, tok, source="action").tolist() == [2, 0, -1]


def docs_verl_overrides():
    """The ``key=value`` overrides of the veRL command of docs/kernels.md, as written."""
    text = (ROOT / "docs" / "kernels.md").read_text(encoding="utf-8")
    block = re.compile(r"```bash\n(.*?)```", re.S).search(text, text.index("### veRL"))
    assert block is not None and "verl.trainer.main_ppo" in block.group(1), "docs/kernels.md: no veRL command"
    return re.findall(r"(?<!\S)([\w.]+=\S+)", block.group(1))


def test_reward_loop_manager_and_compute_advantage(tiny_tokenizer_dir):
    """veRL's RewardLoopManager (Ray workers) with the reward settings of docs/kernels.md loads
    TSPORewardLoopManager by importlib; compute_rm_score gives FOLR's token-level rewards (veRL's
    own Search-R1 EM for R, K1 for k*), and compute_advantage with the docs'
    ``algorithm.adv_estimator`` turns them into the reference TSPO advantages."""
    DataProto, AlgoConfig, core_algos, compute_advantage = verl_modules()
    ray = pytest.importorskip("ray", reason=NO_VERL)
    import verl
    from omegaconf import OmegaConf
    from verl.experimental.reward_loop.reward_loop import RewardLoopManager, migrate_legacy_reward_impl

    overrides = docs_verl_overrides()
    assert "algorithm.adv_estimator=tspo" in overrides and len(overrides) == 4, overrides
    cfg = OmegaConf.load(os.path.join(os.path.dirname(verl.__file__), "trainer/config/_generated_ppo_trainer.yaml"))
    cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides + [f"actor_rollout_ref.model.path={tiny_tokenizer_dir}",
                                                                   "reward.num_workers=1"]))
    cfg = migrate_legacy_reward_impl(cfg)                 # as main_ppo does
    tok = load_tokenizer(tiny_tokenizer_dir)
    data, mask = search_r1_dataproto(tok, DataProto)

    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}})
    try:
        manager = RewardLoopManager(cfg)
        assert manager.reward_manager_cls is tv.TSPORewardLoopManager
        scored = manager.compute_rm_score(data)
    finally:
        ray.shutdown()
    want = tv.folr_token_level_rewards(torch.tensor(OUTCOME), torch.tensor(K_STAR), mask, alpha=0.5)
    assert torch.equal(scored.batch["rm_scores"], want)
    assert scored.non_tensor_batch["folr_first_turn"].tolist() == K_STAR
    assert scored.non_tensor_batch["acc"].tolist() == OUTCOME               # veRL's own Search-R1 EM

    data.batch["token_level_rewards"] = scored.batch["rm_scores"]            # what fit() does (no KL in reward)
    adv = compute_advantage(data, cfg.algorithm.adv_estimator, config=cfg.algorithm).batch["advantages"]
    seg = turns_from_action_mask(mask)
    ref, _ = reference.turn_advantages(torch.tensor(OUTCOME), torch.tensor(K_STAR), seg.num_turns,
                                       torch.zeros(3, dtype=torch.long), seg.turn_id, mask.bool())
    assert torch.allclose(adv, ref, atol=1e-6)
    row2 = adv[2][mask[2].bool()]
    assert row2[0] > row2[-1]          # FOLR: row 2 failed, but its search turn retrieved the answer


def test_reward_loop_scores_pickle_and_assemble(tiny_tokenizer_dir):
    """The per-sample score is a float R carrying k* through pickling (Ray); the class pickles by
    reference; assemble_rm_scores takes FolrScores, (R, k*) pairs or plain floats."""
    DataProto = verl_modules()[0]
    data, mask = search_r1_dataproto(load_tokenizer(tiny_tokenizer_dir), DataProto)
    cls = tv.TSPORewardLoopManager
    assert pickle.loads(pickle.dumps(cls)) is cls
    score = pickle.loads(pickle.dumps(tv.FolrScore(1.0, 1)))
    assert score == 1.0 and score.first_turn == 1 and torch.tensor([score]).tolist() == [1.0]
    got = cls.assemble_rm_scores(data, [tv.FolrScore(1.0, 1), 1.0, (0.0, 0)])
    assert torch.equal(got, tv.folr_token_level_rewards(torch.tensor(OUTCOME), torch.tensor(K_STAR), mask, 0.5))
    with pytest.raises(ValueError, match="scores"):
        cls.assemble_rm_scores(data, [1.0])


def test_legacy_reward_manager_on_a_dataproto(tiny_tokenizer_dir):
    """TSPORewardManager (veRL's AbstractRewardManager interface) is registered in veRL's legacy
    registry and scores a DataProto; the estimator then gives the reference advantages."""
    DataProto = verl_modules()[0]
    from verl.workers.reward_manager import get_reward_manager_cls
    assert get_reward_manager_cls("tspo") is tv.TSPORewardManager
    tok = load_tokenizer(tiny_tokenizer_dir)
    data, mask = search_r1_dataproto(tok, DataProto)
    out = tv.TSPORewardManager(tok, alpha=0.5)(data, return_dict=True)
    assert out["reward_extra_info"] == {"outcome": OUTCOME, "folr_first_turn": K_STAR}
    want = tv.folr_token_level_rewards(torch.tensor(OUTCOME), torch.tensor(K_STAR), mask, 0.5)
    assert torch.equal(out["reward_tensor"], want)
    scored = tv.TSPORewardManager(tok, compute_score=lambda **kw: {"score": 0.25})(data)
    assert torch.allclose(scored, tv.folr_token_level_rewards(torch.full((3,), 0.25), torch.tensor(K_STAR), mask, 0.5))


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
