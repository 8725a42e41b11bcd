"""The warm-start builder runs end to end on a few questions: demonstrations laid out as rollouts,
SFT lowers the loss, and the saved policy loads and writes the protocol's tags."""
import json
import os

import pytest


def test_warm_start_smoke(tmp_path, monkeypatch):
    monkeypatch.setenv("TSPO_FAST_CACHE", os.environ.get("TSPO_FAST_CACHE", str(tmp_path / "cache")))
    from tspo_fast.models.tiny import TinyModelSpec
    from tspo_fast.worldgen.warmstart import WarmStartSpec, build_warm_start
    spec = WarmStartSpec(seed=3, model=TinyModelSpec(hidden_size=64, num_layers=1, num_heads=2, num_kv_heads=1,
                                                     intermediate_size=128, vocab_target=512),
                         demos_per_question=2, epochs=2, max_questions=24, batch_size=8, lr=1e-2,
                         copy_examples=64, reading_examples=40)
    out = build_warm_start(str(tmp_path / "warm"), spec, progress=False)
    info = json.load(open(os.path.join(out, "warmstart.json")))
    assert info["spec"]["model"]["num_layers"] == 1 and info["spec"]["model"]["seed"] == 3   # the model as built
    assert info["demonstrations"] == 48 and info["copy_examples"] == 64
    assert info["habit_demonstrations"] == 24           # the last stage: one demonstration per question
    for key in ("search_first_prob_before_habit", "search_first_prob"):
        assert 0.0 < info[key] < 1.0
    assert 0.0 <= info["copy_accuracy"] <= 1.0
    assert info["last_loss"] < info["first_loss"] - 1.0
    from transformers import AutoModelForCausalLM

    from tspo_fast.models import load_tokenizer
    tok = load_tokenizer(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    for tag in ("<search>", "</search>", "<answer>", "<information>"):
        assert tok.decode(tok(tag, add_special_tokens=False)["input_ids"]) == tag
    assert model.config.hidden_size // model.config.num_attention_heads == 32  # vLLM CPU head size
    assert model.config.num_hidden_layers == 1 and model.config.intermediate_size == 128


@pytest.mark.parametrize("world", ["world", "hops"])
def test_shipped_policies_were_built_from_the_current_default_spec(world):
    """The shipped warm-start policies (tspo_fast/world/*_policy) have the shape of the default spec's
    model, and their warmstart.json (a record of the build; nothing reads it back as a spec) lists
    the default spec's values.  Those files were written before the spec held its model as a
    TinyModelSpec: the model's fields are at the top level there."""
    from dataclasses import asdict

    from tspo_fast.world import warm_policy_dir
    from tspo_fast.worldgen.hops_warmstart import HopsWarmStartSpec
    from tspo_fast.worldgen.warmstart import WarmStartSpec
    folder = warm_policy_dir(world)
    spec = asdict(WarmStartSpec() if world == "world" else HopsWarmStartSpec())
    model = spec.pop("model")
    recorded = json.load(open(os.path.join(folder, "warmstart.json")))["spec"]
    recorded_model = {k: recorded.pop(k) for k in list(recorded) if k in model and k != "seed"}
    assert recorded == spec
    assert recorded_model == {k: v for k, v in model.items() if k in recorded_model}
    cfg = json.load(open(os.path.join(folder, "config.json")))
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
            cfg["intermediate_size"], cfg["max_position_embeddings"], cfg["tie_word_embeddings"]) == (
        model["hidden_size"], model["num_layers"], model["num_heads"], model["num_kv_heads"],
        model["intermediate_size"], model["max_position_embeddings"], model["tie_word_embeddings"])


def test_demonstrations_use_the_support_passages():
    import random

    from tspo_fast.data import load_examples
    from tspo_fast.world import qa_path
    from tspo_fast.worldgen.warmstart import _passages, demonstration
    passages = _passages()
    ex = next(e for e in load_examples(qa_path("train")) if e.extra.get("hops") == 2)
    rng = random.Random(0)
    seen = set()
    for _ in range(200):
        turns = demonstration(ex, passages, ["x", "y"], rng)
        seen.add(len(turns))
        if len(turns) == 3 and ex.aliases[0] in turns[-1][0]:   # the good behaviour: both hops, gold answer
            assert [q for _, q in turns[:2]] == [passages[str(s)][0] for s in ex.extra["support"]]
    assert seen == {1, 2, 3}


def test_habit_behaviours_answer_from_memory_at_the_given_share():
    import random

    from tspo_fast.data import load_examples
    from tspo_fast.world import qa_path
    from tspo_fast.worldgen.warmstart import BEHAVIOURS, _passages, demonstration, habit_behaviours
    for share in (0.0, 0.3, 0.55, 1.0):
        mix = dict(habit_behaviours(share))
        assert abs(sum(mix.values()) - 1.0) < 1e-9 and mix["no_search"] == share
        others = {b: w for b, w in BEHAVIOURS if b != "no_search"}
        if share < 1.0:   # the searching behaviours keep their proportions
            ratios = {b: mix[b] / w for b, w in others.items()}
            assert max(ratios.values()) - min(ratios.values()) < 1e-9
    passages = _passages()
    ex = next(e for e in load_examples(qa_path("train")) if e.extra.get("hops") == 2)
    rng = random.Random(1)
    turns = [demonstration(ex, passages, ["x", "y"], rng, habit_behaviours(0.55)) for _ in range(2000)]
    memory = sum(len(t) == 1 and t[0][1] is None for t in turns) / len(turns)
    assert abs(memory - 0.55) < 0.04
    assert all(len(demonstration(ex, passages, ["x"], rng, habit_behaviours(1.0))) == 1 for _ in range(20))


def test_passage_kinds_match_the_generator():
    from collections import Counter

    from tspo_fast.worldgen import generate
    from tspo_fast.worldgen.warmstart import _passages, passage_kind
    kinds = Counter(passage_kind(*p) for p in _passages().values())
    assert kinds == {"person": generate.N_PEOPLE, "company": generate.N_COMPANIES, "city": generate.N_CITIES,
                     "river": generate.N_RIVERS, "country": generate.N_COUNTRIES}


def test_copy_examples_name_a_random_entity_of_the_right_kind():
    from tspo_fast.data import load_examples
    from tspo_fast.models import load_tokenizer, resolve_model_path
    from tspo_fast.world import qa_path
    from tspo_fast.worldgen.warmstart import QTYPE_KIND, _passages, copy_examples, passage_kind
    tok = load_tokenizer(resolve_model_path("bundled:warmstart"))
    passages = _passages()
    kind_of = {t: passage_kind(t, x) for t, x in passages.values()}
    train = load_examples(qa_path("train"))
    train_questions = {e.question for e in train}
    rows = copy_examples(tok, train, passages, 200, seed=3)
    novel = 0
    for ids, mask in rows:
        p = mask.index(True)
        assert all(mask[p:]) and not any(mask[:p])
        prompt, action = tok.decode(ids[:p]), tok.decode(ids[p:])
        query = action.split("<search>")[1].split("</search>")[0].strip()
        question = prompt.split("Question: ")[-1].split("\n")[0]
        assert query in question and kind_of[query] in QTYPE_KIND.values()
        novel += question not in train_questions
    assert novel > 150   # mostly questions the training set never asks: copying is the only way


def test_smollm2_warm_start_builder_runs_and_merges(tmp_path, monkeypatch):
    """The SmolLM2 builder end to end on a tiny base (bundled:tiny) and a few training questions:
    a LoRA adapter on the top layer only, the loss falls, and the merged folder loads."""
    import pytest
    import torch
    pytest.importorskip("peft")
    monkeypatch.setenv("TSPO_FAST_CACHE", os.environ.get("TSPO_FAST_CACHE", str(tmp_path / "cache")))
    from safetensors.torch import load_file

    from tspo_fast.models import resolve_model_path
    from tspo_fast.models.adapters import merge_adapter
    from tspo_fast.worldgen.smollm2_warmstart import (
        SMOL_BEHAVIOURS,
        SmolWarmStartSpec,
        answer_only,
        build_smollm2_warm_start,
    )
    from tspo_fast.worldgen.warmstart import habit_behaviours
    mix = dict(habit_behaviours(0.6, SMOL_BEHAVIOURS))
    assert abs(sum(mix.values()) - 1.0) < 1e-9 and mix["no_search"] == 0.6 and "wrong_answer" not in mix
    # the reading examples' loss: the last action only (here positions 5 and 6)
    assert answer_only([([9] * 7, [False, True, True, False, False, True, True])])[0][1] == [False] * 5 + [True] * 2
    spec = SmolWarmStartSpec(base="bundled:tiny", questions=16, reading=4, epochs=3, batch_size=4, lora_layers=1,
                             rank=4, lr=1e-2, probe_questions=4)
    out = build_smollm2_warm_start(str(tmp_path / "adapter"), spec, progress=False)
    info = json.load(open(os.path.join(out, "warmstart.json")))
    assert info["demonstrations"] == 16 and info["reading_examples"] == 4 and info["steps"] == 3 * (4 + 1)
    assert json.load(open(os.path.join(out, "adapter_config.json")))["base_model_name_or_path"] == "bundled:tiny"
    assert info["last_loss"] < info["first_loss"]
    assert 0.0 < info["search_first_prob"] < 1.0
    weights = load_file(os.path.join(out, "adapter_model.safetensors"))
    assert weights and all(".layers.1." in k for k in weights)           # the top layer of bundled:tiny's 2
    merged = merge_adapter(resolve_model_path("bundled:tiny"), out, str(tmp_path / "merged"))
    from transformers import AutoModelForCausalLM
    lm = AutoModelForCausalLM.from_pretrained(merged)
    assert torch.isfinite(lm(input_ids=torch.tensor([[1, 2, 3]])).logits).all()
