"""Helpers shared by the rollout / engine / sync tests: small real retrievers and a scripted
engine (a stand-in policy whose actions the test chooses; the agent loop is what is tested).
"""
from __future__ import annotations

import re
import time
from typing import Callable, Sequence

from tspo_fast.engines.base import FINISH_EOS, FINISH_LENGTH, FINISH_STOP, Generation, SamplingConfig, find_stop

PASSAGES = [
    {"id": "1", "contents": '"Paris"\nParis is the capital and largest city of France.'},
    {"id": "2", "contents": '"Berlin"\nBerlin is the capital of Germany.'},
    {"id": "3", "contents": '"Mount Everest"\nMount Everest is the highest mountain.\nIt is in Nepal.'},
    {"id": "4", "contents": '"Amazon River"\nThe Amazon is the largest river by discharge.'},
    {"id": "5", "contents": '"Marie Curie"\nMarie Curie won two Nobel Prizes.'},
]


def _words(s: str) -> set[str]:
    return set(re.findall(r"\w+", s.lower()))


class KeywordRetriever:
    """Ranks passages by word overlap with the query (ties by passage order)."""

    def __init__(self, passages: Sequence[dict] = PASSAGES):
        self.passages = list(passages)
        self.calls: list[list[str]] = []

    def retrieve(self, queries: list[str], topk: int) -> list[list[dict]]:
        self.calls.append(list(queries))
        out = []
        for q in queries:
            qw = _words(q)
            scored = sorted(((len(qw & _words(p["contents"])), -i, p) for i, p in enumerate(self.passages)),
                            key=lambda x: (x[0], x[1]), reverse=True)
            out.append([{"document": dict(p), "score": float(s)} for s, _, p in scored[:topk]])
        return out


class FailingRetriever:
    """Always raises ConnectionError; counts attempts."""

    def __init__(self):
        self.attempts = 0

    def retrieve(self, queries: list[str], topk: int) -> list[list[dict]]:
        self.attempts += 1
        raise ConnectionError("retrieval server unreachable (test)")


class SlowRetriever:
    """Takes ``delay`` seconds; gives up with TimeoutError after its own ``timeout``
    (``timeout=None``: just sleeps ``delay``, a hanging server)."""

    def __init__(self, delay: float = 30.0, timeout: float | None = 0.3):
        self.delay, self.timeout, self.attempts = delay, timeout, 0

    def retrieve(self, queries: list[str], topk: int) -> list[list[dict]]:
        self.attempts += 1
        if self.timeout is not None and self.timeout < self.delay:
            time.sleep(self.timeout)
            raise TimeoutError(f"retrieval timed out after {self.timeout} s")
        time.sleep(self.delay)
        return [[] for _ in queries]


class ScriptedEngine:
    """An engine whose next action text is chosen by ``policy(context_text, turn_index)``.

    The text is tokenized and then treated like sampled ids: cut after the token completing a
    stop string, or at ``max_new_tokens``; log-probs are distinct negative numbers so the
    tests can check they land on the right tokens.
    """

    supports_sleep = False

    def __init__(self, tokenizer, policy: Callable[[str, int], str], max_model_len: int = 8192,
                 streaming: bool = False, per_step: int = 1, step_delay: float = 0.0):
        self.tokenizer = tokenizer
        self.policy = policy
        self.max_model_len = max_model_len
        self.supports_streaming = streaming
        self.per_step = per_step           # streaming: requests finished per step (oldest first)
        self.step_delay = step_delay       # streaming: seconds one step takes (generation time)
        self.calls: list[int] = []  # batch size of each generate call
        self.emitted: list[list[int]] = []
        self._queue: list[tuple[str, list[int], SamplingConfig]] = []
        self._n = 0
        self.steps = 0
        self.aborted: list[str] = []
        self.priorities: list[int] = []    # streaming: the priority of each submitted request

    def generate(self, prompts_token_ids, sampling: SamplingConfig, keys=None) -> list[Generation]:
        self.calls.append(len(prompts_token_ids))
        return [self._one(p, sampling) for p in prompts_token_ids]

    # streaming, as the vLLM engine does it
    def submit(self, prompt_ids, sampling: SamplingConfig, key: int = 0, priority: int = 0) -> str:
        self._n += 1
        self._queue.append((f"r{self._n}", list(prompt_ids), sampling))
        self.priorities.append(priority)
        return f"r{self._n}"

    def step(self):
        time.sleep(self.step_delay)
        self.steps += 1
        done, self._queue = self._queue[:self.per_step], self._queue[self.per_step:]
        return [(rid, self._one(p, s)) for rid, p, s in done]

    def num_pending(self) -> int:
        return len(self._queue)

    def abort(self, request_ids):
        self.aborted += list(request_ids)
        self._queue = [q for q in self._queue if q[0] not in set(request_ids)]

    def _one(self, p, sampling: SamplingConfig) -> Generation:
        ctx = self.tokenizer.decode(p)
        turn = ctx.count("<information>") + ctx.count("My previous action is invalid")
        ids = self.tokenizer(self.policy(ctx, turn), add_special_tokens=False)["input_ids"]
        reason, stop_str = FINISH_LENGTH, None
        for t in range(len(ids)):
            hit = find_stop(self.tokenizer.decode(ids[:t + 1]), sampling.stop)
            if hit is not None:
                ids, reason, stop_str = ids[:t + 1], FINISH_STOP, hit[1]
                break
            if ids[t] == self.tokenizer.eos_token_id:
                ids, reason = ids[:t + 1], FINISH_EOS
                break
        ids = ids[:sampling.max_new_tokens]
        if len(ids) == sampling.max_new_tokens and reason != FINISH_STOP:
            reason = FINISH_LENGTH if reason != FINISH_EOS else reason
        self.emitted.append(list(ids))
        return Generation(list(ids), [-0.01 * (k + 1) for k in range(len(ids))],
                          self.tokenizer.decode(ids), reason, stop_str)

    def load_weights(self, named_tensors):
        raise NotImplementedError

    def reset_prefix_cache(self):
        return True

    def sleep(self, level=1):
        pass

    def wake_up(self, tags=None):
        pass
