"""Packed micro-batches (docs/algorithm.md §4; tspo_fast/training/packing.py): the plan keeps every
row whole and under the budget, packed rows never attend to each other (same log-probs and
gradients as padded rows), and the update skips passes it does not need.  The DeepSpeed update
itself (same weights packed / padded, 1 and 2 ranks) is tests/test_trainer.py's exactness test."""
from __future__ import annotations

import dataclasses
import inspect
import math
import random

import pytest
import torch

from tspo_fast.config import LossConfig, load_config
from tspo_fast.env.batch import Trajectory, collate
from tspo_fast.models import load_causal_lm
from tspo_fast.models.tiny import TinyModelSpec, build_tiny_model
from tspo_fast.training.packing import MicroBatch, micro_batches, plan_bins
from tspo_fast.training.policy import FusedHeadPolicy
from tspo_fast.training.ppo import TRAINER_LOSS_FIELDS, loss_kwargs, plan_update, rollout_mismatch
from tspo_kernels import fused_linear_pg_loss


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    spec = TinyModelSpec(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=128)
    return build_tiny_model(str(tmp_path_factory.mktemp("pack") / "m"), spec=spec)


def _batch(vocab, rows=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    trajs = []
    for i in range(rows):
        t = Trajectory(torch.randint(0, vocab, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g).tolist(),
                       uid=f"q{i // 2}")
        for k in range(int(torch.randint(1, 4, (1,), generator=g))):
            t.append(torch.randint(0, vocab, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g).tolist(), k, False)
            t.append(torch.randint(0, vocab, (int(torch.randint(0, 6, (1,), generator=g)),), generator=g).tolist(), k, True)
            t.num_turns = k + 1
        trajs.append(t)
    b = collate(trajs, pad_id=0)
    b.rollout_logp = torch.where(b.loss_mask, -torch.rand(b.loss_mask.shape, generator=g), torch.zeros(()))
    return b, torch.randn(b.input_ids.shape, generator=g) * b.loss_mask


# ----------------------------------------------------------------------------- planning
@pytest.mark.parametrize("seed", range(6))
def test_plan_keeps_rows_whole_under_the_budget(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 60) for _ in range(rng.randint(1, 40))]
    budget = rng.randint(60, 200)
    n_bins = rng.randint(1, 5)
    bins = plan_bins(lengths, budget, n_bins)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))     # every row exactly once
    assert all(sum(lengths[i] for i in b) <= budget for b in bins)
    assert all(b == sorted(b) for b in bins)                                  # rows keep their order
    assert len(bins) >= max(n_bins, math.ceil(sum(lengths) / budget))
    assert plan_bins(lengths, budget, n_bins) == bins                          # deterministic


def test_row_longer_than_the_budget_is_named():
    with pytest.raises(ValueError, match=r"train.max_tokens_per_micro: uid 'nq/7' has 90 tokens.*budget of 64"):
        plan_bins([10, 90, 5], 64, names=["nq/1", "nq/7", "nq/9"])


def test_more_bins_than_rows_gives_empty_micro_batches():
    assert plan_bins([5, 3], 100, n_bins=4) == [[0], [1], [], []]


# ----------------------------------------------------------------------------- numerics
def _policy(model_dir, packing):
    return FusedHeadPolicy(load_causal_lm(model_dir), chunk_size=16, packing=packing).eval()


def _layouts(batch, adv, budget):
    rows = list(range(len(batch)))
    packed = micro_batches(batch, rows, adv, None, packing=True, budget=budget, micro_size=0, device="cpu")
    padded = micro_batches(batch, rows, adv, None, packing=False, budget=0, micro_size=3, device="cpu")
    return packed, padded


def _logprobs(policy, mbs, shape):
    full = torch.zeros(shape)
    with torch.no_grad():
        for mb in mbs:
            lp, _ = policy(**mb.model_inputs(), mode="logprobs")
            mb.scatter(lp, full)
    return full


def test_packed_rows_do_not_attend_to_each_other(model_dir):
    """Packed and padded layouts give the same per-token log-probs (fp32, 1e-5 relative), and a
    packed micro-batch holds no padding."""
    batch, adv = _batch(load_causal_lm(model_dir).config.vocab_size)
    packed, padded = _layouts(batch, adv, budget=64)
    assert len(packed) > 1 and all(mb.tokens == mb.slots for mb in packed)
    assert sum(mb.tokens for mb in packed) == int(batch.attention_mask.sum())
    lp_pack = _logprobs(_policy(model_dir, True), packed, batch.input_ids.shape)
    lp_pad = _logprobs(_policy(model_dir, False), padded, batch.input_ids.shape)
    m = batch.loss_mask
    assert m.sum() > 20
    torch.testing.assert_close(lp_pack[m], lp_pad[m], rtol=1e-5, atol=1e-6)
    # one row alone through the plain model gives the same numbers (nothing leaks between rows)
    lm = load_causal_lm(model_dir)
    r = 3
    n = int(batch.attention_mask[r].sum())
    with torch.no_grad():
        logits = lm(input_ids=batch.input_ids[r:r + 1, :n]).logits[0].float()
    alone = torch.log_softmax(logits[:-1], -1).gather(1, batch.input_ids[r, 1:n, None])[:, 0]
    sel = m[r, 1:n]
    torch.testing.assert_close(lp_pack[r, 1:n][sel], alone[sel], rtol=1e-5, atol=1e-6)


def test_packed_and_padded_gradients_agree(model_dir):
    batch, adv = _batch(load_causal_lm(model_dir).config.vocab_size, seed=1)
    packed, padded = _layouts(batch, adv, budget=48)
    norm = float(batch.loss_mask.sum())
    grads = []
    for packing, mbs in ((True, packed), (False, padded)):
        pol = _policy(model_dir, packing)
        for mb in mbs:
            out = pol(**mb.model_inputs(), mode="loss", old_logp=None, advantages=mb.advantages, normalizer=norm,
                      beta=0.0)
            out.loss.backward()
        grads.append({k: p.grad.clone() for k, p in pol.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], rtol=1e-4, atol=1e-6, msg=k)


def test_an_empty_micro_batch_trains_nothing(model_dir):
    batch, adv = _batch(load_causal_lm(model_dir).config.vocab_size, rows=1)
    pol = _policy(model_dir, True)
    empty = micro_batches(batch, [], adv, None, packing=True, budget=64, micro_size=1, device="cpu")
    assert len(empty) == 1 and empty[0].rows == [] and empty[0].tokens == 0
    out = pol(**empty[0].model_inputs(), mode="loss", old_logp=None, advantages=empty[0].advantages, normalizer=1.0)
    out.loss.backward()
    assert float(out.loss.detach()) == 0.0
    assert all(p.grad is None or not p.grad.any() for p in pol.parameters())


# ----------------------------------------------------------------------------- passes and metrics
def test_on_policy_update_needs_no_pi_old_pass():
    batch, adv = _batch(100)
    base = ["rollout.n=1", "train.prompts_per_step=8", "train.max_tokens_per_micro=64"]
    one = plan_update(batch, adv, load_config(None, base + ["train.mini_batch_prompts=8"]), "cpu")
    assert one.on_policy and len(one.minis) == 1
    two_epochs = plan_update(batch, adv, load_config(None, base + ["train.mini_batch_prompts=8",
                                                                   "train.ppo_epochs=2"]), "cpu")
    assert not two_epochs.on_policy
    minis = plan_update(batch, adv, load_config(None, base + ["train.mini_batch_prompts=4"]), "cpu")
    assert not minis.on_policy and len(minis.minis) == 2 and [mb.rows for mb in minis.minis[1]][0][0] >= 4


def test_rollout_mismatch_by_hand():
    trainer = torch.tensor([-1.0, -2.0, -0.5])
    rollout = torch.tensor([-1.0, -2.5, -0.25])
    d = trainer - rollout
    m = rollout_mismatch([(trainer, rollout)])
    assert m["mean_abs"] == pytest.approx(0.25) and m["max_abs"] == pytest.approx(0.5)
    assert m["k3_kl"] == pytest.approx(float((torch.exp(d) - d - 1).mean()))
    assert rollout_mismatch([]) == {}
    assert isinstance(MicroBatch, type)


def test_every_loss_field_reaches_k3_by_one_function():
    """``loss_kwargs`` builds K3's keyword arguments from ``loss.*``: each field but the trainer's own
    is a parameter of ``fused_linear_pg_loss`` of the same name (a new field that is not fails here)."""
    k3 = set(inspect.signature(fused_linear_pg_loss).parameters)
    lo = load_config(None, ["loss.eps_low=0.1", "loss.eps_high=0.28", "loss.dual_clip=3", "loss.kl_coef=0.05",
                            "loss.kl_clamp=5", "loss.entropy_coef=0.01", "loss.tis_cap=2"]).loss
    ref, roll = torch.zeros(3), torch.ones(3)
    kw = loss_kwargs(lo, ref_logp=ref, rollout_logp=roll)
    assert set(kw) <= k3, sorted(set(kw) - k3)
    fields = {f.name for f in dataclasses.fields(LossConfig)}
    assert set(TRAINER_LOSS_FIELDS) <= fields and (fields - set(TRAINER_LOSS_FIELDS)) <= set(kw)
    assert {k: v for k, v in kw.items() if k not in ("ref_logp", "rollout_logp")} == dict(
        eps_low=0.1, eps_high=0.28, dual_clip=3.0, kl_clamp=5.0, entropy_coef=0.01, tis_cap=2.0, beta=0.05)
    assert kw["ref_logp"] is ref and kw["rollout_logp"] is roll
    off = loss_kwargs(LossConfig(), rollout_logp=roll)      # no reference pass: beta 0; no tis_cap: no rollout_logp
    assert off["beta"] == 0.0 and off["ref_logp"] is None and off["rollout_logp"] is None


# ----------------------------------------------------------------------------- shared prompts
def _group_batch(vocab, groups=3, n=4, seed=0):
    """``groups`` prompts with ``n`` answers each (the answers differ); the last group's rows have the
    same uid as the first's but another prompt (they must not share)."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda lo, hi: torch.randint(0, vocab, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()
    prompts = [rand(3, 12) for _ in range(groups)]
    trajs = []
    for gi, prompt in enumerate(prompts):
        for _ in range(n):
            t = Trajectory(list(prompt), uid="q0" if gi == groups - 1 else f"q{gi}")
            for k in range(int(torch.randint(1, 3, (1,), generator=g))):
                t.append(rand(1, 9), k, False)
                t.append(rand(0, 5), k, True)
                t.num_turns = k + 1
            trajs.append(t)
    b = collate(trajs, pad_id=0)
    b.rollout_logp = torch.where(b.loss_mask, -torch.rand(b.loss_mask.shape, generator=g), torch.zeros(()))
    return b, torch.randn(b.input_ids.shape, generator=g) * b.loss_mask


def test_prompt_groups_share_only_equal_prompts_and_respect_the_budget():
    from tspo_fast.training.packing import prompt_groups
    batch, _ = _group_batch(100)
    units = prompt_groups(batch, list(range(len(batch))), budget=10 ** 6)
    assert units == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]          # uid q0 twice, two prompts: two units
    lens = batch.attention_mask.sum(1).tolist()
    p = int(batch.prompt_len[4])
    budget = p + max(lens[r] - p for r in range(4, 8))
    small = prompt_groups(batch, [4, 5, 6, 7], budget=budget)
    assert sorted(r for u in small for r in u) == [4, 5, 6, 7] and len(small) > 1
    assert all(p + sum(lens[r] - p for r in u) <= budget for u in small)


def test_shared_prompts_run_each_prompt_once_with_the_same_log_probs_and_gradients(model_dir):
    """A group's prompt runs once, every answer attends to it: per-token log-probs and gradients of
    the shared layout equal the packed layout's (fp32 rounding), and take/scatter invert each other."""
    from tspo_fast.training.packing import micro_batches as mbs_of
    batch, adv = _group_batch(load_causal_lm(model_dir).config.vocab_size, seed=3)
    rows = list(range(len(batch)))
    plain = mbs_of(batch, rows, adv, None, packing=True, budget=80, micro_size=0, device="cpu")
    shared = mbs_of(batch, rows, adv, None, packing=True, budget=80, micro_size=0, device="cpu", share_prompts=True)
    saved = sum(int(batch.prompt_len[u]) for u in (1, 2, 3, 5, 6, 7, 9, 10, 11))
    assert sum(mb.tokens for mb in plain) - sum(mb.tokens for mb in shared) == saved and len(shared) > 1
    for mb in shared:                                           # take, then scatter back: the batch's values
        back = mb.scatter(mb.take(adv), torch.zeros_like(adv))
        assert torch.equal(back[mb.rows], adv[mb.rows] * batch.attention_mask[mb.rows])
    pol = lambda: FusedHeadPolicy(load_causal_lm(model_dir), chunk_size=16, packing=True, share_prompts=True).eval()
    lp_plain, lp_shared = _logprobs(pol(), plain, batch.input_ids.shape), _logprobs(pol(), shared, batch.input_ids.shape)
    m = batch.loss_mask
    assert m.sum() > 40
    torch.testing.assert_close(lp_shared[m], lp_plain[m], rtol=1e-5, atol=1e-6)
    norm = float(m.sum())
    grads = []
    for mbs in (plain, shared):
        p = pol()
        for mb in mbs:
            p(**mb.model_inputs(), mode="loss", old_logp=None, advantages=mb.advantages, normalizer=norm,
              beta=0.0).loss.backward()
        grads.append({k: q.grad.clone() for k, q in p.named_parameters() if q.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-4, atol=1e-6, msg=k)


def test_share_prompts_needs_packing():
    from tspo_fast.config import ConfigError
    with pytest.raises(ConfigError, match="train.share_prompts"):
        load_config(None, ["train.packing=false", "train.share_prompts=true"])
    with pytest.raises(ValueError, match="share_prompts needs packing"):
        FusedHeadPolicy(torch.nn.Linear(2, 2), share_prompts=True)


@pytest.mark.slow
def test_trainer_with_shared_prompts_logs_what_separate_rows_log(train_env, tmp_path):
    """Two ZeRO-3 steps with the KL pass: sharing the prompts changes the losses only by rounding and
    runs fewer tokens (each group's prompt once)."""
    from test_trainer import SMALL, _rows_by
    common = SMALL + ["loss.kl_coef=0.05", "rollout.engine=hf", "train.eval_every=0", "train.checkpoint_every=0",
                      "train.total_steps=2", "train.packing=true", "train.max_tokens_per_micro=4096"]
    rows = _rows_by(train_env, tmp_path, common, "train.share_prompts")
    assert [r["step"] for r in rows["true"]] == [1, 2]
    for a, b in zip(rows["true"], rows["false"]):
        assert a["reward/mean"] == b["reward/mean"] and a["rollout/response_tokens"] == b["rollout/response_tokens"]
        for k in ("loss/pg", "loss/kl", "loss/entropy", "train/grad_norm", "mismatch/mean_abs"):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-7), (a["step"], k)
        assert a["train/tokens"] < b["train/tokens"]                    # the prompts ran once per group
