"""The multi-turn search agent loop (docs/algorithm.md §1, Search-R1 protocol), token-in / token-out.

For B prompts x n samples, each turn generates for every active trajectory in one engine call
(stop strings ``</search>``, ``</answer>``, EOS, ``max_new_tokens_per_turn``), parses the action,
sends all search queries of the turn to the retriever in one batched call and appends the
observation ids.  Sampled ids are never decoded and re-encoded: the trained sequence is exactly
the engine's ids plus the tokenized observations.  The result is a ``RolloutBatch``.

The retriever is any :class:`tspo_fast.retrieval.Retriever`; its failures arrive as
:class:`~tspo_fast.retrieval.RetrievalError` (after the retrieval layer's retries) and leave
here naming the turn and the queries.
"""
from __future__ import annotations

import time
from typing import Optional, Sequence

from ..config import RolloutConfig, check_rollout
from ..data.prompts import PromptItem
from ..engines.base import Engine, Generation, SamplingConfig
from ..retrieval.base import RetrievalError, Retriever, check_result
from .batch import RolloutBatch, Trajectory, collate
from .protocol import INVALID_ACTION_OBS, STOPS, parse_action, search_observation

__all__ = ["SearchAgent"]


class SearchAgent:
    """``SearchAgent(engine, retriever, tokenizer, config).rollout(prompts)``.

    config: the run's :class:`~tspo_fast.config.RolloutConfig` (read, never changed);
    topk: passages per search (``retrieval.topk``); max_prompt_tokens: the longest prompt
    accepted (``data.max_prompt_tokens``).  Per-call sampling (``n``, ``temperature``, ``seed``)
    goes to :meth:`rollout` as arguments.
    """

    def __init__(self, engine: Engine, retriever: Retriever, tokenizer, config: RolloutConfig = RolloutConfig(), *,
                 topk: int = 3, max_prompt_tokens: int = 512, pad_to_multiple: int = 1):
        check_rollout(config)
        if topk < 1 or max_prompt_tokens < 1:
            raise ValueError(f"SearchAgent: topk and max_prompt_tokens must be >= 1, got {topk}, {max_prompt_tokens}")
        self.engine = engine
        self.retriever = retriever
        self.tokenizer = tokenizer
        self.config = config
        self.topk = topk
        self.max_prompt_tokens = max_prompt_tokens
        self.pad_to_multiple = pad_to_multiple
        ctx = getattr(engine, "max_model_len", None)
        if ctx is not None and max_prompt_tokens + config.max_response_tokens > ctx:
            raise ValueError(
                f"max_prompt_tokens ({max_prompt_tokens}) + max_response_tokens "
                f"({config.max_response_tokens}) exceed the engine's context ({ctx} tokens)")
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    # ------------------------------------------------------------------ public
    def rollout(self, prompts: Sequence[PromptItem], *, n: Optional[int] = None,
                temperature: Optional[float] = None, seed: Optional[int] = None) -> RolloutBatch:
        """Roll out ``n`` (default ``config.n``) trajectories per prompt.

        temperature: default ``config.temperature`` (0 = greedy, as evaluation uses);
        seed: the sampling seed of this call (turn k of request i uses ``seed + 1_000_003 k + i``;
        None: the engine's own generator).
        """
        cfg = self.config
        n = cfg.n if n is None else n
        temperature = cfg.temperature if temperature is None else temperature
        if n < 1:
            raise ValueError(f"rollout: n must be >= 1, got {n}")
        for p in prompts:
            if len(p.prompt_ids) > self.max_prompt_tokens:
                raise ValueError(
                    f"prompt uid={p.uid!r} has {len(p.prompt_ids)} tokens, more than "
                    f"max_prompt_tokens={self.max_prompt_tokens}")
            if len(p.prompt_ids) == 0:
                raise ValueError(f"prompt uid={p.uid!r} is empty")
        trajs = [Trajectory(list(p.prompt_ids), p.uid, list(p.aliases), p.data_source)
                 for p in prompts for _ in range(n)]
        stats = dict(gen_seconds=0.0, retrieval_seconds=0.0, generated_tokens=0.0, obs_tokens=0.0,
                     engine_calls=0.0, retrieval_calls=0.0, search_queries=0.0,
                     invalid_actions=0.0, answered=0.0, truncated=0.0)
        t0 = time.perf_counter()
        for turn in range(cfg.max_turns + 1):
            active = [t for t in trajs if not t.done]
            if not active:
                break
            final = turn == cfg.max_turns  # the extra turn with search disabled
            sampling = self._sampling(active, temperature, None if seed is None else seed + 1_000_003 * turn)
            gens = self._generate(active, sampling, stats)
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
        return collate(trajs, self.pad_id, self.pad_to_multiple, stats)

    # ------------------------------------------------------------------ steps
    def _sampling(self, active: list[Trajectory], temperature: float, seed: Optional[int]) -> SamplingConfig:
        # no row can keep more than its remaining response budget (rows are cut to it after)
        budget = max(self.config.max_response_tokens - len(t.response_ids) for t in active)
        return SamplingConfig(temperature=temperature, top_p=self.config.top_p,
                              max_new_tokens=min(self.config.max_new_tokens_per_turn, budget), stop=STOPS, seed=seed)

    def _generate(self, active: list[Trajectory], sampling: SamplingConfig, stats: dict) -> list[Generation]:
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
        """One batched retriever call; a failure names the turn and the queries."""
        try:
            return check_result(self.retriever.retrieve(list(queries), self.topk), len(queries))
        except Exception as e:  # noqa: BLE001 (re-raised with the turn and the queries)
            shown = queries[:5] + ([f"... ({len(queries) - 5} more)"] if len(queries) > 5 else [])
            cause = str(e) if isinstance(e, RetrievalError) else f"{type(e).__name__}: {e}"
            raise RetrievalError(f"retrieval failed at turn {turn} for queries {shown}: {cause}",
                                 retryable=False, attempts=getattr(e, "attempts", 1)) from e
