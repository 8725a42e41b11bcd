"""The hops world's warm start (tspo_fast/worldgen/hops_warmstart.py): demonstrations that follow the
chain and read right but stop early, reading and copy examples, and the builder end to end."""
import json
import os
import random

import pytest

from tspo_fast.protocol import parse_action
from tspo_fast.retrieval import InProcessRetriever
from tspo_fast.retrieval.bundled import bundled_index
from tspo_fast.worldgen import hops
from tspo_fast.worldgen.hops_warmstart import Demonstrator, HopsWarmStartSpec


@pytest.fixture(scope="module")
def world():
    return hops.build()


@pytest.fixture(scope="module")
def retriever():
    return InProcessRetriever.from_dir(bundled_index("bm25", hops.WORLD))


def _demo(world, retriever, seed=0, **kw):
    return Demonstrator(world, retriever, HopsWarmStartSpec(**kw), random.Random(seed))


def _three_hop(world, i=0):
    return [e for e in world.practice() if e.extra["hops"] == 3][i]


def test_a_complete_demonstration_searches_the_chain_and_reads_the_answer(world, retriever):
    d = _demo(world, retriever, p_continue=1.0, p_bad_query=0.0, p_memory=0.0, swap_share=0.0)
    for i in range(5):
        ex = _three_hop(world, i)
        turns = d.turns(ex)
        walk, _ = d.walk(ex)
        assert [q for _, q, _ in turns[:-1]] == [e.name for e in walk[:-1]]
        for (_, _, obs), e in zip(turns[:-1], walk[:-1]):          # the right passage is Doc 1
            assert obs.startswith(f"\n\n<information>Doc 1(Title: {e.name})")
        kind, answer = parse_action(turns[-1][0])
        assert kind == "answer" and answer == ex.aliases[0]
        assert answer in turns[-1][0].split("</think>")[0]            # stated as the last link's fact


def test_an_early_stop_guesses_without_stating_a_fact(world, retriever):
    d = _demo(world, retriever, p_continue=0.0, p_bad_query=0.0, p_memory=0.0)
    for i in range(5):
        ex = _three_hop(world, i)
        turns = d.turns(ex)
        assert len(turns) == 2 and turns[0][1] is not None
        kind, answer = parse_action(turns[1][0])
        assert kind == "answer" and answer != ex.aliases[0]
        assert turns[1][0].startswith(f"<think> The answer is {answer}. </think>")


def test_a_swapped_last_passage_is_read_not_recalled(world, retriever):
    d = _demo(world, retriever, p_continue=1.0, p_bad_query=0.0, p_memory=0.0, swap_share=1.0)
    ex = _three_hop(world)
    turns = d.turns(ex)
    _, answer = parse_action(turns[-1][0])
    assert answer != ex.aliases[0] and f" {answer}." in turns[-2][2] and f" {ex.aliases[0]}." not in turns[-2][2]


def test_depth_follows_p_continue(world, retriever):
    """Over 600 three-hop demonstrations, the share that reach the last hop is p_continue^2 (within 5 sd)."""
    p = 0.5
    d = _demo(world, retriever, seed=random.randrange(2**31), p_continue=p, p_bad_query=0.0, p_memory=0.0)
    exs = [e for e in world.practice() if e.extra["hops"] == 3][:600]
    full = sum(len(d.turns(ex)) == 4 for ex in exs)
    sd = (len(exs) * p * p * (1 - p * p)) ** 0.5
    assert abs(full - len(exs) * p * p) < 5 * sd


def test_reading_and_copy_examples(world, retriever):
    d = _demo(world, retriever, seed=random.randrange(2**31))
    ex = _three_hop(world, 2)
    for _ in range(10):
        question, turns = d.reading(ex)
        assert question == ex.question
        last_obs = turns[-2][2]
        kind, content = parse_action(turns[-1][0])
        value = content if kind == "answer" else turns[-1][1]
        assert f" {value}." in last_obs                       # the value the last passage states
        question, turns = d.copying(ex)
        assert len(turns) == 1 and turns[0][1] in question


def test_builder_smoke(tmp_path, monkeypatch):
    monkeypatch.setenv("TSPO_FAST_CACHE", os.environ.get("TSPO_FAST_CACHE", str(tmp_path / "cache")))
    from transformers import AutoModelForCausalLM

    from tspo_fast.models import load_tokenizer
    from tspo_fast.models.tiny import TinyModelSpec
    from tspo_fast.worldgen.ceiling import reading_probe
    from tspo_fast.worldgen.hops_warmstart import build_hops_warm_start
    spec = HopsWarmStartSpec(model=TinyModelSpec(hidden_size=64, num_layers=1, num_heads=2, num_kv_heads=1,
                                                 intermediate_size=128, vocab_target=512),
                             max_questions=24, batch_size=8, lr=1e-2, copy_examples=32, copy_first_batches=2,
                             reading_examples=24, reading_first_batches=2)
    out = build_hops_warm_start(str(tmp_path / "warm"), spec, progress=False)
    info = json.load(open(os.path.join(out, "warmstart.json")))
    assert info["demonstrations"] == 24 and info["copy_examples"] == 32 and info["reading_examples"] == 24
    assert 0.0 < info["search_first_prob"] < 1.0
    tok = load_tokenizer(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    for tag in ("<search>", "</search>", "<answer>", "<information>"):
        assert tok.decode(tok(tag, add_special_tokens=False)["input_ids"]) == tag
    assert model.config.hidden_size // model.config.num_attention_heads == 32  # vLLM CPU head size
    res = reading_probe(out, limit=4, max_new_tokens=8)
    assert res["n"] == 4 and 0.0 <= res["overall"] <= 1.0
