"""The asynchronous agent loop (tspo_fast/env/agent.py): same episodes as the turn-synchronous loop,
retrieval off the engine's path, bounded concurrency, clear failures and a step deadline.

Fast: the scripted engine (tests/_tiny.py) implements the streaming interface as the vLLM engine
does (submit / step / abort); the real vLLM engine's async == sync check is in test_engines.py.
"""
from __future__ import annotations

import threading
import time

import pytest
import torch
from _tiny import FailingRetriever, KeywordRetriever, ScriptedEngine, SlowRetriever

from tspo_fast.config import RolloutConfig
from tspo_fast.data import PromptItem
from tspo_fast.env.agent import SearchAgent
from tspo_fast.models.tiny import build_tiny_model, load_tokenizer
from tspo_fast.retrieval import Resilient, RetrievalError, RetryPolicy

QUESTIONS = ["capital of France?", "highest mountain?", "Germany capital?", "who won two Nobel Prizes?"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(build_tiny_model(str(tmp_path_factory.mktemp("async") / "m")))


def prompts(tok, qs=QUESTIONS):
    return [PromptItem(tok(f"Question: {q}\n", add_special_tokens=False)["input_ids"], uid=f"u{i}", aliases=["Paris"])
            for i, q in enumerate(qs)]


def varied(ctx: str, turn: int) -> str:
    """Trajectories that differ: some answer at once, some search once or twice, some ramble."""
    if "France" in ctx:
        return "<answer> Paris </answer>" if turn else "<think>look</think>\n<search> capital of France </search>"
    if "mountain" in ctx:
        return ["<search> highest mountain </search>", "<search> Nepal </search>", "<answer> Everest </answer>"][min(turn, 2)]
    if "Germany" in ctx:
        return "I do not know." if turn < 2 else "<answer> Berlin </answer>"
    return "<answer> Marie Curie </answer>"


def never_answers(ctx: str, turn: int) -> str:
    return "<search> Berlin capital Germany </search> and then a lot more text " * 3


def _agent(engine, retriever, tok, **rollout):
    return SearchAgent(engine, retriever, tok, RolloutConfig(**rollout), topk=2, max_prompt_tokens=256)


FIELDS = ("input_ids", "attention_mask", "turn_id", "is_obs", "loss_mask", "rollout_logp", "num_turns",
          "num_searches", "truncated", "group_id", "prompt_len")


def _same(a, b):
    for f in FIELDS:
        assert torch.equal(getattr(a, f), getattr(b, f)), f
    assert a.answer_text == b.answer_text and a.observation_texts == b.observation_texts
    assert a.action_texts == b.action_texts


@pytest.mark.parametrize("policy", [varied, never_answers])
@pytest.mark.parametrize("per_step", [1, 3, 100])
def test_async_gives_the_same_episodes_as_sync(tok, policy, per_step):
    limits = dict(n=3, max_turns=3, max_response_tokens=90, max_obs_tokens=40, max_new_tokens_per_turn=48)
    sync = _agent(ScriptedEngine(tok, policy), KeywordRetriever(), tok, mode="sync", **limits).rollout(prompts(tok))
    eng = ScriptedEngine(tok, policy, streaming=True, per_step=per_step)
    ret = KeywordRetriever()
    b = _agent(eng, ret, tok, mode="async", **limits).rollout(prompts(tok))
    _same(sync, b)
    assert b.stats.async_loop and not sync.stats.async_loop
    assert b.stats.search_queries == sync.stats.search_queries == sum(len(c) for c in ret.calls)
    if policy is never_answers:
        assert b.truncated.any()                        # the response budget cut some rows: same rule


def test_hf_style_engine_keeps_the_sync_loop(tok):
    eng = ScriptedEngine(tok, varied)                   # no streaming
    b = _agent(eng, KeywordRetriever(), tok, n=2, mode="async").rollout(prompts(tok))
    assert not b.stats.async_loop and len(eng.calls) >= 2


class _Timed(KeywordRetriever):
    """Each call takes ``delay`` seconds; records how many calls overlap and how many engine
    steps ran while each call was in flight."""

    def __init__(self, delay, engine=None):
        super().__init__()
        self.delay, self.engine, self.active, self.max_active = delay, engine, 0, 0
        self.lock, self.steps_during = threading.Lock(), []

    def retrieve(self, queries, topk):
        with self.lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        s0 = self.engine.steps if self.engine else 0
        time.sleep(self.delay)
        with self.lock:
            self.active -= 1
        self.steps_during.append((self.engine.steps if self.engine else 0) - s0)
        return super().retrieve(queries, topk)


def test_retrieval_overlaps_generation_and_is_bounded(tok):
    """While queries wait on a slow retriever the engine keeps stepping the other trajectories;
    at most retrieval_concurrency calls are in flight."""
    limits = dict(n=4, max_turns=3, max_obs_tokens=40, max_new_tokens_per_turn=48)
    eng = ScriptedEngine(tok, varied, streaming=True, per_step=1, step_delay=0.002)
    slow = _Timed(0.05, eng)
    b = _agent(eng, slow, tok, mode="async", retrieval_concurrency=2, **limits).rollout(prompts(tok))
    assert b.stats.retrieval_calls >= 2 and slow.max_active <= 2
    assert max(slow.steps_during) > 0                           # the engine stepped during a retrieval
    # turn k asks priority k: earlier turns (most work left) leave the engine's queue first
    assert sorted(eng.priorities) == sorted(k for K in b.num_turns.tolist() for k in range(K))
    assert b.stats.retrieval_wait_seconds < b.stats.retrieval_seconds      # overlapped
    s = _agent(ScriptedEngine(tok, varied), _Timed(0.05), tok, mode="sync", **limits).rollout(prompts(tok))
    assert s.stats.retrieval_wait_seconds == pytest.approx(s.stats.retrieval_seconds)  # the barrier waits
    _same(s, b)
    # the critical path: the slowest trajectory's own turns and searches, within the rollout
    for r in (b, s):
        st, most = r.stats, int(r.num_searches.max())
        assert most >= 1
        assert st.critical_path_seconds == pytest.approx(st.critical_engine_seconds + st.critical_retrieval_seconds)
        assert 0.05 * most <= st.critical_path_seconds <= st.total_seconds   # each search waits 50 ms
        assert 0 < st.critical_tokens <= r.loss_mask.sum(1).max()
    # sync: every trajectory waits for the whole turn, so the last one's chain is the rollout
    assert s.stats.critical_path_seconds >= 0.9 * s.stats.total_seconds - 0.05


def test_queries_of_one_step_share_a_retriever_call(tok):
    ret = KeywordRetriever()
    eng = ScriptedEngine(tok, varied, streaming=True, per_step=1000)   # every request ends in the same step
    b = _agent(eng, ret, tok, n=2, mode="async", retrieval_window_ms=0).rollout(prompts(tok, QUESTIONS[:2]))
    assert len(ret.calls[0]) == 4 and b.stats.retrieval_calls == len(ret.calls)


@pytest.mark.timeout(60)
def test_failing_retriever_names_turn_and_queries_and_frees_the_engine(tok):
    eng = ScriptedEngine(tok, varied, streaming=True, per_step=1)
    ret = Resilient(FailingRetriever(), RetryPolicy(retries=1, backoff_s=0.01, timeout_s=None))
    with pytest.raises(RetrievalError, match=r"turn 0 for queries \['capital of France'.*after 2 attempt.*ConnectionError"):
        _agent(eng, ret, tok, n=1, mode="async").rollout(prompts(tok))
    assert eng.num_pending() == 0                                    # nothing left running in the engine


@pytest.mark.timeout(60)
def test_deadline_cuts_and_flags_instead_of_hanging(tok):
    """A retriever that hangs (no timeout of its own) cannot hold the step past rollout.max_seconds."""
    eng = ScriptedEngine(tok, varied, streaming=True, per_step=1)
    t0 = time.perf_counter()
    b = _agent(eng, SlowRetriever(delay=60, timeout=None), tok, n=2, mode="async", max_seconds=0.5).rollout(prompts(tok))
    assert time.perf_counter() - t0 < 5
    assert b.stats.deadline_truncated > 0 and b.truncated.sum() == b.stats.deadline_truncated
    answered = [a is not None for a in b.answer_text]
    assert any(answered)                                             # those that never searched finished
    # sync loop: the same deadline between turns
    s = _agent(ScriptedEngine(tok, varied), KeywordRetriever(), tok, n=1, mode="sync", max_seconds=1e-9).rollout(
        prompts(tok))
    assert s.stats.deadline_truncated == len(s) and s.truncated.all()
