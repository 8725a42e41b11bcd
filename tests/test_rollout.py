"""Agent loop tests (docs/algorithm.md §1): protocol, token-in/token-out, limits, retriever failures.

Fast: a scripted engine (actions chosen by the test) and the real HF engine on a tiny model;
no vLLM here (see test_engines.py).
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
from _tiny import FailingRetriever, KeywordRetriever, ScriptedEngine, SlowRetriever

from tspo_fast.config import RolloutConfig
from tspo_fast.data import PromptItem
from tspo_fast.env.agent import SearchAgent
from tspo_fast.env.batch import RolloutStats, collate, group_id_of
from tspo_fast.models.tiny import build_tiny_model, load_tokenizer
from tspo_fast.protocol import INVALID_ACTION_OBS, format_docs, parse_action, search_observation
from tspo_fast.retrieval import Resilient, RetrievalError, RetryPolicy


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_model(str(tmp_path_factory.mktemp("tiny") / "m"))


@pytest.fixture(scope="module")
def tok(tiny_dir):
    return load_tokenizer(tiny_dir)


@pytest.fixture(scope="module")
def notag_tok(tmp_path_factory):
    d = build_tiny_model(str(tmp_path_factory.mktemp("notag") / "m"), include_tags=False)
    return load_tokenizer(d)


def prompts(tok, questions, uids=None):
    return [PromptItem(tok(f"Question: {q}\n", add_special_tokens=False)["input_ids"],
                       uid=(uids[i] if uids else f"q{i}"), aliases=[f"a{i}"], data_source="nq")
            for i, q in enumerate(questions)]


def make_agent(eng, ret, tok, *, topk=3, max_prompt_tokens=2048, **rollout):
    """The agent with the run's rollout settings ``rollout`` (a RolloutConfig's fields)."""
    return SearchAgent(eng, ret, tok, RolloutConfig(**rollout), topk=topk, max_prompt_tokens=max_prompt_tokens)


def search_then_answer(ctx: str, turn: int) -> str:
    if turn == 0:
        q = "capital of France" if "France" in ctx else "highest mountain"
        return f"<think>I need to look it up.</think>\n<search> {q} </search> trailing text"
    return "<think>found it</think>\n<answer> Paris </answer>"


# ---------------------------------------------------------------------------- formatting
def test_format_docs_exact():
    res = KeywordRetriever().retrieve(["highest mountain Nepal"], 2)[0]
    assert format_docs(res) == ("Doc 1(Title: Mount Everest) Mount Everest is the highest mountain.\n"
                                "It is in Nepal.\n"
                                "Doc 2(Title: Paris) Paris is the capital and largest city of France.\n")
    assert search_observation(res).startswith("\n\n<information>Doc 1(Title: Mount Everest) ")
    assert search_observation(res).endswith("of France.</information>\n\n")
    assert format_docs([]) == ""


def test_parse_action():
    assert parse_action("<think>x</think> <search> who is x </search>") == ("search", "who is x")
    assert parse_action("blah <answer> Paris </answer>") == ("answer", "Paris")
    assert parse_action("<answer>a</answer> <search>q</search>") == ("answer", "a")
    assert parse_action("<search>q</search><answer>a</answer>") == ("search", "q")
    assert parse_action("no tags at all") == (None, "")
    assert parse_action("<search> unfinished") == (None, "")
    assert parse_action("<search>multi\nline</search>") == ("search", "multi\nline")


def test_invalid_action_text_is_spec_exact():
    assert INVALID_ACTION_OBS == (
        "\nMy previous action is invalid. If I want to search, I should put the query between <search> "
        "and </search>. If I want to give the final answer, I should put the answer between <answer> and "
        "</answer>. Let me try again.\n")


def test_group_id_stable():
    assert group_id_of(17) == 17
    assert group_id_of("nq_3") == group_id_of("nq_3") != group_id_of("nq_4")
    assert 0 <= group_id_of("x") < 2 ** 63


# ---------------------------------------------------------------------------- protocol
def test_search_then_answer_layout(tok):
    ret = KeywordRetriever()
    eng = ScriptedEngine(tok, search_then_answer)
    items = prompts(tok, ["capital of France?", "highest mountain?"], uids=["u0", "u1"])
    batch = make_agent(eng, ret, tok, n=2, max_turns=4, topk=2).rollout(items)
    assert len(batch) == 4
    assert eng.calls == [4, 4]                     # one engine call per turn for all active rows
    assert len(ret.calls) == 1 and len(ret.calls[0]) == 4  # all queries of the turn in one call
    assert ret.calls[0][0] == "capital of France"
    assert batch.num_turns.tolist() == [2, 2, 2, 2]
    assert batch.num_searches.tolist() == [1, 1, 1, 1]
    assert batch.answer_text == ["Paris"] * 4
    assert batch.truncated.tolist() == [False] * 4
    assert batch.group_id.tolist() == [group_id_of("u0")] * 2 + [group_id_of("u1")] * 2
    assert batch.stats.retrieval_calls == 1 and batch.stats.search_queries == 4
    assert (batch.stats.engine_calls, batch.stats.answered, batch.stats.async_loop) == (2, 4, False)
    logged = batch.stats.as_dict()                  # the typed counters as floats, for logs and benchmarks
    assert set(logged) == {f.name for f in dataclasses.fields(RolloutStats)} | {"engine_busy_frac"}
    assert logged["search_queries"] == 4.0 and logged["async_loop"] == 0.0
    assert logged["engine_busy_frac"] == pytest.approx(batch.stats.gen_seconds / batch.stats.total_seconds)
    moved = batch.to("cpu")
    moved.stats.search_queries += 1                 # a copy: the batch's own stats stay as they were
    assert batch.stats.search_queries == 4
    for dt, name in [(torch.int64, "input_ids"), (torch.int64, "attention_mask"), (torch.int32, "turn_id"),
                     (torch.bool, "is_obs"), (torch.bool, "loss_mask"), (torch.float32, "rollout_logp")]:
        assert getattr(batch, name).dtype == dt, name

    # row 0: exactly prompt + sampled ids + observation ids + sampled ids, then padding
    p = items[0].prompt_ids
    a0, a1 = eng.emitted[0], eng.emitted[4]
    obs = search_observation(ret.retrieve(["capital of France"], 2)[0])
    o0 = tok(obs, add_special_tokens=False)["input_ids"]
    row = p + a0 + o0 + a1
    L = batch.input_ids.shape[1]
    assert batch.input_ids[0, :len(row)].tolist() == row
    assert batch.attention_mask[0].tolist() == [1] * len(row) + [0] * (L - len(row))
    assert batch.turn_id[0, :len(row)].tolist() == [-1] * len(p) + [0] * (len(a0) + len(o0)) + [1] * len(a1)
    assert batch.is_obs[0, :len(row)].tolist() == [False] * (len(p) + len(a0)) + [True] * len(o0) + [False] * len(a1)
    assert torch.equal(batch.loss_mask, (batch.turn_id >= 0) & ~batch.is_obs)
    assert batch.prompt_len[0] == len(p)
    # the action was cut right after </search>: " trailing text" never reached the sequence
    assert tok.decode(a0).endswith("</search>")
    assert batch.action_texts[0][0].endswith("</search>") and batch.observation_texts[0] == [obs, ""]
    # rollout log-probs sit on the sampled tokens only, in order
    lp = batch.rollout_logp[0]
    assert lp[len(p):len(p) + len(a0)].tolist() == pytest.approx([-0.01 * (k + 1) for k in range(len(a0))])
    assert (lp[~batch.loss_mask[0]] == 0).all()


def test_invalid_action_then_final_turn_without_search(tok):
    # never answers, always searches -> max_turns turns with observations, then one last turn
    ret = KeywordRetriever()
    def pol(ctx, turn):
        return "I am confused." if turn == 0 else "<search> Berlin </search>"

    eng = ScriptedEngine(tok, pol)
    b = make_agent(eng, ret, tok, n=1, max_turns=3, topk=1).rollout(prompts(tok, ["q?"]))
    assert b.num_turns.tolist() == [4]                          # 3 turns + the final one
    assert b.observation_texts[0][0] == INVALID_ACTION_OBS
    assert b.observation_texts[0][1].startswith("\n\n<information>Doc 1(Title: Berlin)")
    assert b.observation_texts[0][3] == ""                     # search disabled in the last turn
    assert len(ret.calls) == 2 and b.stats.invalid_actions == 1
    assert b.answer_text == [None] and not b.truncated[0]
    last = b.turn_id[0] == 3
    assert last.any() and not b.is_obs[0][last].any()
    assert eng.calls == [1, 1, 1, 1]


def test_max_turns_zero_is_single_turn(tok):
    eng = ScriptedEngine(tok, lambda c, t: "<search> x </search>")
    b = make_agent(eng, KeywordRetriever(), tok, n=1, max_turns=0).rollout(prompts(tok, ["q"]))
    assert b.num_turns.tolist() == [1] and b.num_searches.tolist() == [0]


def test_observation_cut_to_max_obs_tokens(tok):
    eng = ScriptedEngine(tok, search_then_answer)
    b = make_agent(eng, KeywordRetriever(), tok, n=1, max_obs_tokens=7).rollout(
        prompts(tok, ["France?"]))
    assert int(b.is_obs[0].sum()) == 7
    assert b.answer_text == ["Paris"] and not b.truncated[0]
    assert b.observation_texts[0][0] == tok.decode(b.input_ids[0][b.is_obs[0]].tolist())


def test_max_response_tokens_truncates_and_flags(tok):
    eng = ScriptedEngine(tok, search_then_answer)
    a0 = len(tok("<think>I need to look it up.</think>\n<search> capital of France </search>",
                 add_special_tokens=False)["input_ids"])
    b = make_agent(eng, KeywordRetriever(), tok, n=1, max_response_tokens=a0 + 5).rollout(prompts(tok, ["France?"]))
    assert b.truncated.tolist() == [True] and b.answer_text == [None]
    assert int(b.response_lengths()[0]) == a0 + 5 and int(b.is_obs[0].sum()) == 5
    # an action longer than the remaining budget is cut too
    b = make_agent(eng, KeywordRetriever(), tok, n=1, max_response_tokens=4).rollout(prompts(tok, ["France?"]))
    assert b.truncated.tolist() == [True] and int(b.response_lengths()[0]) == 4 and b.num_turns.tolist() == [1]


def test_prompt_too_long_names_it(tok):
    eng = ScriptedEngine(tok, search_then_answer)
    items = prompts(tok, ["short", "a much much longer question " * 20], uids=["ok", "nq_train_42"])
    with pytest.raises(ValueError, match=r"nq_train_42.*max_prompt_tokens=16"):
        make_agent(eng, KeywordRetriever(), tok, n=1, max_prompt_tokens=16).rollout(items)


def test_context_limit_checked_against_engine(tok):
    eng = ScriptedEngine(tok, search_then_answer, max_model_len=1024)
    with pytest.raises(ValueError, match="exceed the engine's context"):
        make_agent(eng, KeywordRetriever(), tok, max_prompt_tokens=512, max_response_tokens=1024)


# ---------------------------------------------------------------------------- retriever failures
@pytest.mark.timeout(30)
def test_failing_retriever_clear_error_after_retries(tok):
    ret = FailingRetriever()
    policy = RetryPolicy(retries=2, backoff_s=0.01, timeout_s=None)
    agent = make_agent(ScriptedEngine(tok, search_then_answer), Resilient(ret, policy), tok, n=2)
    with pytest.raises(RetrievalError, match=r"turn 0 for queries.*capital of France.*after 3 attempt.*ConnectionError"):
        agent.rollout(prompts(tok, ["France?"]))
    assert ret.attempts == 3


@pytest.mark.timeout(30)
def test_slow_retriever_times_out_with_clear_error(tok):
    ret = SlowRetriever(delay=60, timeout=0.2)
    policy = RetryPolicy(retries=1, backoff_s=0.01, timeout_s=None)
    agent = make_agent(ScriptedEngine(tok, search_then_answer), Resilient(ret, policy), tok, n=1)
    with pytest.raises(RetrievalError, match=r"turn 0 .*after 2 attempt.*TimeoutError"):
        agent.rollout(prompts(tok, ["France?"]))
    assert ret.attempts == 2


@pytest.mark.timeout(30)
def test_hanging_retriever_capped_by_the_retry_layer(tok):
    ret = SlowRetriever(delay=60, timeout=None)  # no timeout of its own
    agent = make_agent(ScriptedEngine(tok, search_then_answer), Resilient(ret, RetryPolicy(retries=0, timeout_s=0.3)),
                       tok, n=1)
    with pytest.raises(RetrievalError, match=r"did not answer within 0.3 s"):
        agent.rollout(prompts(tok, ["France?"]))


def test_retriever_wrong_length_is_an_error(tok):
    class Short(KeywordRetriever):
        def retrieve(self, queries, topk):
            return super().retrieve(queries, topk)[:-1]
    with pytest.raises(RetrievalError, match="for 2 queries"):
        make_agent(ScriptedEngine(tok, search_then_answer), Short(), tok, n=2).rollout(prompts(tok, ["F"]))


# ---------------------------------------------------------------------------- tokenizers
def test_tags_missing_from_vocab_still_work(notag_tok):
    tok = notag_tok
    assert "</search>" not in tok.get_vocab() and len(tok("</search>", add_special_tokens=False)["input_ids"]) > 1
    eng = ScriptedEngine(tok, search_then_answer)
    b = make_agent(eng, KeywordRetriever(), tok, n=1).rollout(prompts(tok, ["France?"]))
    assert b.answer_text == ["Paris"] and b.num_searches.tolist() == [1]
    assert b.action_texts[0][0].endswith("</search>")


# ---------------------------------------------------------------------------- real HF engine
def _recompute_logp(model, batch):
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, batch.input_ids[:, 1:, None])[..., 0]
    return torch.nn.functional.pad(lp, (1, 0))


@pytest.mark.timeout(120)
def test_hf_engine_rollout_token_in_token_out(tiny_dir, tok):
    from tspo_fast.engines.hf import HFEngine

    eng = HFEngine.from_pretrained(tiny_dir)
    agent = make_agent(eng, KeywordRetriever(), tok, n=3, max_turns=2, max_new_tokens_per_turn=24, max_obs_tokens=40,
                       max_prompt_tokens=64, max_response_tokens=256)
    b = agent.rollout(prompts(tok, ["France?", "mountain"]), seed=1)
    assert len(b) == 6 and (b.num_turns >= 1).all() and (b.num_turns <= 3).all()
    # every row's prompt is intact, and the engine's log-probs are the model's log-probs of
    # exactly those ids in that context: the sequence is what was sampled, nothing re-encoded
    for i in range(6):
        assert b.input_ids[i, :b.prompt_len[i]].tolist() == prompts(tok, ["France?", "mountain"])[i // 3].prompt_ids
    ref = _recompute_logp(eng.model, b)
    m = b.loss_mask
    assert m.sum() > 0
    torch.testing.assert_close(b.rollout_logp[m], ref[m], atol=2e-4, rtol=0)
    assert b.stats.gen_seconds > 0


def test_collate_padding_multiple(tok):
    from tspo_fast.env.batch import Trajectory
    t1 = Trajectory([1, 2, 3], "a")
    t1.append([4, 5], 0, False, [-1.0, -2.0])
    t1.append([6], 0, True)
    t2 = Trajectory([7], 5)
    b = collate([t1, t2], pad_id=0, pad_to_multiple=8)
    assert b.input_ids.shape == (2, 8)
    assert b.turn_id[0].tolist() == [-1, -1, -1, 0, 0, 0, -1, -1]
    assert b.loss_mask[0].tolist() == [False] * 3 + [True, True] + [False] * 3
    assert b.rollout_logp[0, 3:5].tolist() == [-1.0, -2.0]
    assert b.group_id.tolist() == [group_id_of("a"), 5] and b.prompt_len.tolist() == [3, 1]


def test_sync_weights_into_hf_engine(tiny_dir):
    """sync_weights with plain parameters into the HF engine, several buckets, tied embeddings."""
    from transformers import AutoModelForCausalLM

    from tspo_fast.engines.hf import HFEngine
    from tspo_fast.engines.sync import sync_weights

    eng = HFEngine.from_pretrained(tiny_dir)
    policy = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.tensor([[5, 6, 7, 8]])
    assert not torch.allclose(eng.model(x).logits, policy(x).logits)
    stats = sync_weights(eng, policy.named_parameters(), bucket_mb=0.05)
    assert stats.num_buckets > 3 and stats.bytes == sum(p.numel() * 4 for p in policy.parameters())
    torch.testing.assert_close(eng.model(x).logits, policy(x).logits)
    with pytest.raises(KeyError, match="no parameter 'module.x'"):
        eng.load_weights([("module.x", torch.zeros(1))])
