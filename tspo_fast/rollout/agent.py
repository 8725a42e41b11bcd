"""The multi-turn search agent loop (SPEC §1, Search-R1 protocol), token-in / token-out.

For B prompts x n samples, each turn generates for every active trajectory in one engine call
(stop strings ``</search>``, ``</answer>``, EOS, ``max_new_tokens_per_turn``), parses the action,
sends all search queries of the turn to the retriever in one batched call and appends the
observation ids. Sampled ids are never decoded and re-encoded: the trained sequence is exactly
the engine's ids plus the tokenized observations. The result is a ``RolloutBatch``.

The retriever is any object with
``retrieve(queries: list[str], topk: int) -> list[list[{"document": {"id", "contents"}, "score"}]]``.
"""
from __future__ import annotations

import queue
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from .batch import RolloutBatch, Trajectory, collate
from .engines import Engine, Generation, SamplingConfig

SEARCH_STOP = "</search>"
ANSWER_STOP = "</answer>"
INVALID_ACTION_OBS = (
    "\nMy previous action is invalid. If I want to search, I should put the query between "
    "<search> and </search>. If I want to give the final answer, I should put the answer "
    "between <answer> and </answer>. Let me try again.\n"
)
_ACTION_RE = re.compile(r"<(search|answer)>(.*?)</\1>", re.DOTALL)
_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


class RetrievalError(RuntimeError):
    """The retriever failed (after retries) or timed out."""


@dataclass
class RolloutConfig:
    """Rollout knobs (SPEC §1 defaults)."""

    n: int = 5
    max_turns: int = 4
    topk: int = 3
    max_new_tokens_per_turn: int = 500
    max_obs_tokens: int = 500
    max_prompt_tokens: int = 2048
    max_response_tokens: int = 4096
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    retrieval_retries: int = 2           # extra attempts after the first failure
    retrieval_backoff_s: float = 0.5     # sleep before retry r: backoff * 2**r
    retrieval_timeout_s: float | None = 120.0  # wall-clock cap per attempt (None: trust retriever)
    pad_to_multiple: int = 1

    def __post_init__(self) -> None:
        for name in ("n", "max_new_tokens_per_turn", "max_prompt_tokens", "max_response_tokens", "topk"):
            if getattr(self, name) < 1:
                raise ValueError(f"RolloutConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_turns", "max_obs_tokens", "retrieval_retries"):
            if getattr(self, name) < 0:
                raise ValueError(f"RolloutConfig.{name} must be >= 0, got {getattr(self, name)}")


@dataclass
class PromptItem:
    """One question: its already-built prompt ids and what rewards need later."""

    prompt_ids: list[int]
    uid: Any
    aliases: list[str] = field(default_factory=list)
    data_source: str = ""


def format_docs(results: Sequence[dict]) -> str:
    """Format one query's passages: ``Doc {i}(Title: {title}) {text}\\n`` per passage, i from 1.

    ``contents`` is wiki-18 layout ``"Title"\\ntext``: title = first line with surrounding double
    quotes stripped, text = the remaining lines.
    """
    out = []
    for i, item in enumerate(results, start=1):
        contents = item["document"]["contents"]
        title, _, text = contents.partition("\n")
        out.append(f"Doc {i}(Title: {title.strip().strip(chr(34))}) {text}\n")
    return "".join(out)


def search_observation(results: Sequence[dict]) -> str:
    """``\\n\\n<information>{docs}</information>\\n\\n``; docs stripped as Search-R1 does."""
    return f"\n\n<information>{format_docs(results).strip()}</information>\n\n"


def parse_action(text: str) -> tuple[str | None, str]:
    """(``"search"`` | ``"answer"`` | None, content stripped) from an action's text.

    The text is first cut after the first ``</search>`` / ``</answer>`` (what the engine stopped
    on); then the first ``<tag>...</tag>`` pair decides, as in Search-R1.
    """
    ends = [(text.find(s) + len(s)) for s in (SEARCH_STOP, ANSWER_STOP) if s in text]
    if ends:
        text = text[:min(ends)]
    m = _ACTION_RE.search(text)
    if m is None:
        return None, ""
    return m.group(1), m.group(2).strip()


def _call_with_timeout(fn, timeout: float | None):
    """Run ``fn()`` in a daemon thread; raise ``TimeoutError`` after ``timeout`` seconds.

    A call that never returns leaves its (daemon) thread behind; the rollout does not wait for it.
    """
    if timeout is None:
        return fn()
    box: queue.Queue = queue.Queue(maxsize=1)

    def run():
        try:
            box.put((True, fn()))
        except BaseException as e:  # noqa: BLE001  (re-raised in the caller)
            box.put((False, e))

    threading.Thread(target=run, daemon=True, name="tspo-retrieve").start()
    try:
        ok, value = box.get(timeout=timeout)
    except queue.Empty:
        raise TimeoutError(f"retriever did not answer within {timeout} s") from None
    if ok:
        return value
    raise value


class SearchAgent:
    """Runs rollouts: ``SearchAgent(engine, retriever, tokenizer, config).rollout(prompts)``."""

    def __init__(self, engine: Engine, retriever, tokenizer, config: RolloutConfig):
        self.engine = engine
        self.retriever = retriever
        self.tokenizer = tokenizer
        self.config = config
        ctx = getattr(engine, "max_model_len", None)
        if ctx is not None and config.max_prompt_tokens + config.max_response_tokens > ctx:
            raise ValueError(
                f"max_prompt_tokens ({config.max_prompt_tokens}) + max_response_tokens "
                f"({config.max_response_tokens}) exceed the engine's context ({ctx} tokens)")
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    # ------------------------------------------------------------------ public
    def rollout(self, prompts: Sequence[PromptItem]) -> RolloutBatch:
        cfg = self.config
        for p in prompts:
            if len(p.prompt_ids) > cfg.max_prompt_tokens:
                raise ValueError(
                    f"prompt uid={p.uid!r} has {len(p.prompt_ids)} tokens, more than "
                    f"max_prompt_tokens={cfg.max_prompt_tokens}")
            if len(p.prompt_ids) == 0:
                raise ValueError(f"prompt uid={p.uid!r} is empty")
        trajs = [Trajectory(list(p.prompt_ids), p.uid, list(p.aliases), p.data_source)
                 for p in prompts for _ in range(cfg.n)]
        stats = dict(gen_seconds=0.0, retrieval_seconds=0.0, generated_tokens=0.0, obs_tokens=0.0,
                     engine_calls=0.0, retrieval_calls=0.0, search_queries=0.0,
                     invalid_actions=0.0, answered=0.0, truncated=0.0)
        t0 = time.perf_counter()
        for turn in range(cfg.max_turns + 1):
            active = [t for t in trajs if not t.done]
            if not active:
                break
            final = turn == cfg.max_turns  # the extra turn with search disabled
            gens = self._generate(active, turn, stats)
            searches: list[tuple[Trajectory, str]] = []
            for traj, gen in zip(active, gens):
                kind, content = self._take_action(traj, gen, turn)
                if traj.done:
                    continue
                if final:
                    traj.done = True  # no observation after the last turn
                elif kind == "search":
                    searches.append((traj, content))
                else:
                    stats["invalid_actions"] += 1
                    self._append_obs(traj, INVALID_ACTION_OBS, turn)
            if searches:
                queries = [q for _, q in searches]
                t1 = time.perf_counter()
                results = self._retrieve(queries, turn)
                stats["retrieval_seconds"] += time.perf_counter() - t1
                stats["retrieval_calls"] += 1
                stats["search_queries"] += len(queries)
                for (traj, _), res in zip(searches, results):
                    traj.num_searches += 1
                    self._append_obs(traj, search_observation(res), turn)
        for t in trajs:
            stats["obs_tokens"] += sum(t.is_obs)
            stats["answered"] += t.answer_text is not None
            stats["truncated"] += t.truncated
        stats["total_seconds"] = time.perf_counter() - t0
        return collate(trajs, self.pad_id, cfg.pad_to_multiple, stats)

    # ------------------------------------------------------------------ steps
    def _generate(self, active: list[Trajectory], turn: int, stats: dict) -> list[Generation]:
        cfg = self.config
        seed = None if cfg.seed is None else cfg.seed + 1_000_003 * turn
        # no row can keep more than its remaining response budget (rows are cut to it after)
        budget = max(cfg.max_response_tokens - len(t.response_ids) for t in active)
        sampling = SamplingConfig(temperature=cfg.temperature, top_p=cfg.top_p,
                                  max_new_tokens=min(cfg.max_new_tokens_per_turn, budget),
                                  stop=(SEARCH_STOP, ANSWER_STOP), seed=seed)
        t1 = time.perf_counter()
        gens = self.engine.generate([t.context for t in active], sampling)
        stats["gen_seconds"] += time.perf_counter() - t1
        stats["engine_calls"] += 1
        if len(gens) != len(active):
            raise RuntimeError(f"engine returned {len(gens)} generations for {len(active)} prompts")
        stats["generated_tokens"] += sum(len(g.token_ids) for g in gens)
        return gens

    def _take_action(self, traj: Trajectory, gen: Generation, turn: int) -> tuple[str | None, str]:
        """Append the sampled ids (cut to the response budget) and parse the action."""
        budget = self.config.max_response_tokens - len(traj.response_ids)
        ids, logps = list(gen.token_ids), list(gen.logprobs)
        cut = len(ids) > budget
        if cut:
            ids, logps = ids[:budget], logps[:budget]
        traj.append(ids, turn, obs=False, logps=logps)
        traj.num_turns = turn + 1
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        traj.action_texts.append(text)
        traj.observation_texts.append("")
        kind, content = parse_action(text)
        if kind == "answer":
            traj.answer_text = content
            traj.done = True
        if cut or (not traj.done and len(traj.response_ids) >= self.config.max_response_tokens):
            traj.truncated = not traj.done or cut
            traj.done = True
        return kind, content

    def _append_obs(self, traj: Trajectory, text: str, turn: int) -> None:
        """Tokenize an observation (no special tokens), cut to max_obs_tokens and the budget."""
        full = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        budget = self.config.max_response_tokens - len(traj.response_ids)
        shown_ids = full[:min(self.config.max_obs_tokens, budget)]
        if len(shown_ids) >= budget:  # the response budget is used up: stop, flagged
            traj.truncated = True
            traj.done = True
        if len(shown_ids) < len(full):
            text = self.tokenizer.decode(shown_ids)
        traj.append(shown_ids, turn, obs=True)
        traj.observation_texts[-1] = text

    def _retrieve(self, queries: list[str], turn: int) -> list[list[dict]]:
        cfg = self.config
        attempts = cfg.retrieval_retries + 1
        last: BaseException | None = None
        for a in range(attempts):
            try:
                res = _call_with_timeout(lambda: self.retriever.retrieve(list(queries), cfg.topk),
                                         cfg.retrieval_timeout_s)
                if not isinstance(res, list) or len(res) != len(queries):
                    raise RuntimeError(f"retriever returned {type(res).__name__} of length "
                                       f"{len(res) if hasattr(res, '__len__') else '?'} for "
                                       f"{len(queries)} queries")
                return res
            except Exception as e:  # noqa: BLE001
                last = e
                if a + 1 < attempts:
                    time.sleep(cfg.retrieval_backoff_s * 2 ** a)
        shown = queries[:5] + ([f"... ({len(queries) - 5} more)"] if len(queries) > 5 else [])
        raise RetrievalError(
            f"retrieval failed at turn {turn} after {attempts} attempt(s) for queries {shown}: "
            f"{type(last).__name__}: {last}") from last
