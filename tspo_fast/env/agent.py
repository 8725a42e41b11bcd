"""The multi-turn search agent loop (docs/algorithm.md §1, Search-R1 protocol), token-in / token-out.

Two loops behind one ``rollout(prompts) -> RolloutBatch``; both produce the same episodes:

* **async** (``rollout.mode: async``, engines that stream, i.e. vLLM): every trajectory moves on
  alone.  Its turn is a request of the engine; when it ends with ``</search>`` the query goes to
  the retriever at once (the queries of one engine step, or of ``rollout.retrieval_window_ms``,
  share one call, at most ``rollout.retrieval_concurrency`` calls in flight), and the next turn is
  submitted the moment its observation is appended, while the engine keeps generating for the
  others (earlier turns first when requests wait for engine slots);
* **sync** (``mode: sync``, and engines that cannot stream, e.g. HF ``generate``): Search-R1's
  turn barrier — one engine call per turn for every active trajectory, then all the turn's
  queries in one retriever call.

Each turn stops at ``</search>``, ``</answer>``, EOS or ``max_new_tokens_per_turn``.  Sampled
ids are never decoded and re-encoded: the trained sequence is exactly the engine's ids plus the
tokenized observations.  Request seeds depend on (call seed, turn, trajectory) only, never on
batch composition.  ``rollout.max_seconds`` is a step deadline: trajectories unfinished then are
cut and flagged ``truncated`` (``stats.deadline_truncated`` counts them; ``batch.stats`` is a
:class:`~tspo_fast.env.batch.RolloutStats`).

Both loops record each trajectory's own chain: the seconds its turns spent in the engine (from
submission to finish; in the sync loop, the whole engine call it was part of) and its searches
spent at the retriever (from query to observation).  ``stats.critical_path_seconds`` is the
longest chain, split into ``critical_engine_seconds`` and ``critical_retrieval_seconds`` (with
``critical_tokens`` sampled by it).  No loop can end a rollout before its slowest trajectory's
own retrieval waits plus its own turns, so it tells how much of a rollout scheduling can still win.

The retriever is any :class:`tspo_fast.retrieval.Retriever`; its failures arrive as
:class:`~tspo_fast.retrieval.RetrievalError` (after the retrieval layer's retries) and leave
here naming the turn and the queries.
"""
from __future__ import annotations

import queue
import threading
import time
from typing import Dict, List, Optional, Sequence, Tuple

from ..config import RolloutConfig, check_rollout
from ..data.prompts import PromptItem
from ..engines.base import Engine, Generation, SamplingConfig, mix_seed
from ..protocol import INVALID_ACTION_OBS, STOPS, parse_action, search_observation
from ..retrieval.base import RetrievalError, Retriever, check_result
from .batch import RolloutBatch, RolloutStats, Trajectory, collate

__all__ = ["SearchAgent"]


class SearchAgent:
    """``SearchAgent(engine, retriever, tokenizer, config).rollout(prompts)``.

    config: the run's :class:`~tspo_fast.config.RolloutConfig` (read, never changed; None: the defaults);
    topk: passages per search (``retrieval.topk``); max_prompt_tokens: the longest prompt
    accepted (``data.max_prompt_tokens``).  Per-call sampling (``n``, ``temperature``, ``seed``)
    goes to :meth:`rollout` as arguments.
    """

    def __init__(self, engine: Engine, retriever: Retriever, tokenizer, config: Optional[RolloutConfig] = None, *,
                 topk: int = 3, max_prompt_tokens: int = 512, pad_to_multiple: int = 1):
        config = check_rollout(config if config is not None else RolloutConfig())
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
        stats = RolloutStats()
        t0 = time.perf_counter()
        deadline = t0 + cfg.max_seconds if cfg.max_seconds > 0 else None
        chains = _Chains(len(trajs))
        if cfg.mode == "async" and getattr(self.engine, "supports_streaming", False):
            stats.async_loop = True
            self._run_async(trajs, temperature, seed, stats, deadline, chains)
        else:
            self._run_sync(trajs, temperature, seed, stats, deadline, chains)
        for t in trajs:
            stats.obs_tokens += sum(t.is_obs)
            stats.answered += t.answer_text is not None
            stats.truncated += t.truncated
        chains.critical(trajs, stats)
        stats.total_seconds = time.perf_counter() - t0
        return collate(trajs, self.pad_id, self.pad_to_multiple, stats)

    # ------------------------------------------------------------------ the loops
    def _after_action(self, traj: Trajectory, kind: Optional[str], turn: int, stats: RolloutStats) -> str:
        """What a trajectory does after its turn: "done", "search" or "next" (an invalid action's
        correction appended; the next turn follows)."""
        if traj.done:
            return "done"
        if turn == self.config.max_turns:            # the extra turn with search disabled
            traj.done = True
            return "done"
        if kind == "search":
            return "search"
        stats.invalid_actions += 1
        self._append_obs(traj, INVALID_ACTION_OBS, turn)
        return "done" if traj.done else "next"

    def _run_sync(self, trajs: List[Trajectory], temperature: float, seed: Optional[int], stats: RolloutStats,
                  deadline: Optional[float], chains: "_Chains") -> None:
        for turn in range(self.config.max_turns + 1):
            active = [i for i, t in enumerate(trajs) if not t.done]
            if not active:
                break
            if deadline is not None and time.perf_counter() > deadline:
                self._cut_at_deadline([trajs[i] for i in active], stats)
                break
            sampling = self._sampling([trajs[i] for i in active], temperature, seed, turn)
            t1 = time.perf_counter()
            gens = self._generate([trajs[i] for i in active], sampling, active, stats)
            chains.add(active, "engine", time.perf_counter() - t1)
            searches: list[tuple[Trajectory, str]] = []
            searching: list[int] = []
            for i, gen in zip(active, gens):
                traj = trajs[i]
                kind, content = self._take_action(traj, gen, turn)
                if self._after_action(traj, kind, turn, stats) == "search":
                    searches.append((traj, content))
                    searching.append(i)
            if searches:
                queries = [q for _, q in searches]
                t1 = time.perf_counter()
                results = self._retrieve(queries, [turn])
                dt = time.perf_counter() - t1
                chains.add(searching, "retrieval", dt)
                stats.retrieval_seconds += dt
                stats.retrieval_wait_seconds += dt              # the engine idles meanwhile
                stats.retrieval_calls += 1
                stats.search_queries += len(queries)
                for (traj, _), res in zip(searches, results):
                    traj.num_searches += 1
                    self._append_obs(traj, search_observation(res), turn)

    def _run_async(self, trajs: List[Trajectory], temperature: float, seed: Optional[int], stats: RolloutStats,
                   deadline: Optional[float], chains: "_Chains") -> None:
        cfg, eng = self.config, self.engine
        running: Dict[str, Tuple[int, int]] = {}           # request id -> (trajectory, turn)
        batcher = _RetrievalBatcher(self.retriever, self.topk, cfg.retrieval_window_ms / 1000.0,
                                    cfg.retrieval_concurrency)

        def submit(i: int, turn: int) -> None:
            sampling = self._sampling([trajs[i]], temperature, seed, turn)
            # earlier turns first (most work left: the longest remaining chains start soonest, so their
            # searches overlap the others' turns); matters only when requests wait for engine slots
            running[eng.submit(trajs[i].context, sampling, key=i, priority=turn)] = (i, turn)
            chains.start(i)
            stats.engine_calls += 1

        try:
            for i in range(len(trajs)):
                submit(i, 0)
            while running or batcher.pending:
                if deadline is not None and time.perf_counter() > deadline:
                    eng.abort(list(running))
                    running.clear()
                    self._cut_at_deadline([t for t in trajs if not t.done], stats)
                    break
                if running:
                    t1 = time.perf_counter()
                    finished = eng.step()
                    stats.gen_seconds += time.perf_counter() - t1
                    for rid, gen in finished:
                        i, turn = running.pop(rid)
                        chains.stop(i, "engine")
                        stats.generated_tokens += len(gen.token_ids)
                        kind, content = self._take_action(trajs[i], gen, turn)
                        after = self._after_action(trajs[i], kind, turn, stats)
                        if after == "search":
                            batcher.submit((i, turn), content)
                            chains.start(i)
                        elif after == "next":
                            submit(i, turn + 1)
                elif batcher.pending:                          # nothing to generate: wait for an observation
                    t2 = time.perf_counter()
                    batcher.wait(None if deadline is None else max(0.0, deadline - t2))
                    stats.retrieval_wait_seconds += time.perf_counter() - t2
                for (i, turn), hits in batcher.completed():
                    chains.stop(i, "retrieval")
                    traj = trajs[i]
                    traj.num_searches += 1
                    self._append_obs(traj, search_observation(hits), turn)
                    if not traj.done:
                        submit(i, turn + 1)
        finally:
            if running:
                eng.abort(list(running))
            batcher.close(stats)

    def _cut_at_deadline(self, trajs: Sequence[Trajectory], stats: RolloutStats) -> None:
        for t in trajs:
            t.truncated = True
            t.done = True
            stats.deadline_truncated += 1

    # ------------------------------------------------------------------ steps
    def _sampling(self, active: Sequence[Trajectory], temperature: float, seed: Optional[int],
                  turn: int) -> SamplingConfig:
        # no row can keep more than its remaining response budget (rows are cut to it after)
        budget = max(self.config.max_response_tokens - len(t.response_ids) for t in active)
        return SamplingConfig(temperature=temperature, top_p=self.config.top_p,
                              max_new_tokens=min(self.config.max_new_tokens_per_turn, budget), stop=STOPS,
                              seed=None if seed is None else mix_seed(seed, turn))

    def _generate(self, active: Sequence[Trajectory], sampling: SamplingConfig, keys: Sequence[int],
                  stats: RolloutStats) -> list[Generation]:
        t1 = time.perf_counter()
        gens = self.engine.generate([t.context for t in active], sampling, keys=keys)
        stats.gen_seconds += time.perf_counter() - t1
        stats.engine_calls += 1
        if len(gens) != len(active):
            raise RuntimeError(f"engine returned {len(gens)} generations for {len(active)} prompts")
        stats.generated_tokens += sum(len(g.token_ids) for g in gens)
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

    def _retrieve(self, queries: list[str], turns: Sequence[int]) -> list[list[dict]]:
        """One batched retriever call; a failure names the turn(s) and the queries."""
        return _retrieve(self.retriever, queries, self.topk, turns)


def _retrieve(retriever: Retriever, queries: List[str], topk: int, turns: Sequence[int]) -> List[List[dict]]:
    try:
        return check_result(retriever.retrieve(list(queries), topk), len(queries))
    except Exception as e:  # re-raised with the turn and the queries
        shown = queries[:5] + ([f"... ({len(queries) - 5} more)"] if len(queries) > 5 else [])
        cause = str(e) if isinstance(e, RetrievalError) else f"{type(e).__name__}: {e}"
        where = ", ".join(str(t) for t in sorted(set(turns)))
        raise RetrievalError(f"retrieval failed at turn {where} for queries {shown}: {cause}",
                             retryable=False, attempts=getattr(e, "attempts", 1)) from e


class _Chains:
    """Each trajectory's own engine and retrieval seconds (see the module docstring)."""

    def __init__(self, n: int):
        self.seconds = {"engine": [0.0] * n, "retrieval": [0.0] * n}
        self._since: Dict[int, float] = {}

    def add(self, rows: Sequence[int], kind: str, dt: float) -> None:
        for i in rows:
            self.seconds[kind][i] += dt

    def start(self, i: int) -> None:
        self._since[i] = time.perf_counter()

    def stop(self, i: int, kind: str) -> None:
        self.seconds[kind][i] += time.perf_counter() - self._since.pop(i)

    def critical(self, trajs: Sequence[Trajectory], stats: RolloutStats) -> None:
        """The ``critical_*`` fields of ``stats``: the trajectory with the longest chain."""
        eng, ret = self.seconds["engine"], self.seconds["retrieval"]
        if not trajs:
            return
        i = max(range(len(trajs)), key=lambda j: eng[j] + ret[j])
        stats.critical_path_seconds = eng[i] + ret[i]
        stats.critical_engine_seconds, stats.critical_retrieval_seconds = eng[i], ret[i]
        stats.critical_tokens = sum(1 for o in trajs[i].is_obs if not o)


class _RetrievalBatcher:
    """Retrieval off the engine's path for the async loop.

    ``submit(tag, query)`` queues a query; a batch goes to the retriever (one call, on one of
    ``concurrency`` daemon threads) once the oldest queued query has waited ``window_s`` or a
    thread is free and :meth:`wait` is asked; :meth:`completed` hands back ``(tag, hits)`` of
    finished calls and raises a failed call's :class:`RetrievalError` (naming its turns and
    queries).  A call that outlives the rollout (a hung retriever past the deadline) is left
    on its daemon thread.
    """

    def __init__(self, retriever: Retriever, topk: int, window_s: float, concurrency: int):
        self.retriever, self.topk, self.window_s, self.concurrency = retriever, topk, window_s, concurrency
        self._queued: List[Tuple[object, str]] = []
        self._first = 0.0
        self._in_flight = 0
        self._done: "queue.Queue" = queue.Queue()
        self._seconds = 0.0
        self._calls = 0
        self._queries = 0

    @property
    def pending(self) -> bool:
        return bool(self._queued) or self._in_flight > 0 or not self._done.empty()

    def submit(self, tag, query: str) -> None:
        if not self._queued:
            self._first = time.perf_counter()
        self._queued.append((tag, query))

    def _flush(self, force: bool = False) -> None:
        if not self._queued or self._in_flight >= self.concurrency:
            return
        if not force and time.perf_counter() - self._first < self.window_s:
            return
        batch, self._queued = self._queued, []
        self._in_flight += 1
        self._calls += 1
        self._queries += len(batch)
        threading.Thread(target=self._call, args=(batch,), daemon=True, name="tspo-retrieval").start()

    def _call(self, batch) -> None:
        t0 = time.perf_counter()
        try:
            hits = _retrieve(self.retriever, [q for _, q in batch], self.topk, [tag[1] for tag, _ in batch])
            self._done.put((batch, hits, None, time.perf_counter() - t0))
        except BaseException as e:  # raised in the rollout's thread
            self._done.put((batch, None, e, time.perf_counter() - t0))

    def completed(self) -> List[Tuple[object, list]]:
        self._flush()
        out = []
        while True:
            try:
                batch, hits, err, dt = self._done.get_nowait()
            except queue.Empty:
                break
            self._in_flight -= 1
            self._seconds += dt
            if err is not None:
                raise err
            out += [(tag, h) for (tag, _), h in zip(batch, hits)]
        self._flush()
        return out

    def wait(self, timeout: Optional[float]) -> None:
        """Block until a call finishes (or ``timeout`` seconds): nothing else can move meanwhile."""
        self._flush(force=True)
        if self._in_flight and self._done.empty():
            try:
                item = self._done.get(timeout=timeout)
            except queue.Empty:
                return
            self._done.put(item)

    def close(self, stats: RolloutStats) -> None:
        stats.retrieval_seconds += self._seconds
        stats.retrieval_calls += self._calls
        stats.search_queries += self._queries
