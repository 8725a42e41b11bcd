"""A discrete-event model of the two rollout loops of :class:`tspo_fast.env.agent.SearchAgent`:
what the async loop can win over the sync one (Search-R1's turn barrier), and where.

The loops are replayed on a *trace* (every trajectory's turns: tokens to prefill, tokens sampled,
whether the turn ends in a search; :func:`trace_of` reads one off a rollout batch) against a
continuous-batching engine whose step costs ``base + per_seq * sequences + per_prefill_token *
new prompt tokens`` (:class:`StepCost`, :func:`fit_step_cost` fits one to logged steps) and a
retriever whose call costs ``latency + per_call + per_query * queries`` (:class:`RetrievalCost`).
Replaying runs no language model, so one trace can be priced with another engine's step cost (a
GPU's, where a decode step costs nearly the same for 1 or 200 sequences), another retrieval
latency, another number of engine slots or another admission order (:func:`simulate`).

Its figures are predictions. ``bench/rollout_model.py`` measures real rollouts, fits the costs and
checks the model against them (docs/rollout.md, bench/RESULTS.md).
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import numpy as np

__all__ = ["Turn", "Trace", "StepCost", "RetrievalCost", "Result", "simulate", "trace_of", "fit_step_cost"]


@dataclass(frozen=True)
class Turn:
    """One turn of one trajectory.

    prefill: tokens the engine computes before the turn's first sampled token (the prompt for
    turn 0; the previous turn's sampled tokens and the observation after it otherwise);
    gen: tokens sampled (>= 1); search: the turn ends in a search, so the next turn waits on
    the retriever (a turn ending in an invalid action goes on without retrieval).
    """

    prefill: int
    gen: int
    search: bool


Trace = Sequence[Sequence[Turn]]


@dataclass(frozen=True)
class StepCost:
    """Seconds of one engine step: ``base + per_seq * seqs + per_prefill_token * prefill``."""

    base: float
    per_seq: float
    per_prefill_token: float = 0.0

    def __call__(self, seqs: int, prefill: int) -> float:
        return self.base + self.per_seq * seqs + self.per_prefill_token * prefill


@dataclass(frozen=True)
class RetrievalCost:
    """Seconds of one retriever call of ``q`` queries: ``latency + per_call + per_query * q``;
    at most ``concurrency`` calls in flight (the async loop's ``rollout.retrieval_concurrency``)."""

    latency: float
    per_call: float = 0.0
    per_query: float = 0.0
    concurrency: int = 8

    def __call__(self, queries: int) -> float:
        return self.latency + self.per_call + self.per_query * queries


@dataclass
class Result:
    total: float                 # seconds from the first submission to the last trajectory done
    engine_busy: float           # seconds the engine was stepping
    steps: int
    chains: List[float] = field(default_factory=list)   # per trajectory: engine + retrieval seconds

    @property
    def critical_path(self) -> float:
        return max(self.chains, default=0.0)


class _Engine:
    """Continuous batching: every step admits waiting requests (lowest priority key first) up to
    ``slots``, prefills them and samples one token for every running request."""

    def __init__(self, cost: StepCost, slots: Optional[int]):
        self.cost, self.slots = cost, slots
        self.waiting: List[Tuple[tuple, int, int, int, int]] = []   # (key, seq, traj, tokens left, prefill)
        self.running: dict = {}                                # traj -> tokens left
        self.seq = 0
        self.busy = 0.0
        self.steps = 0

    def submit(self, traj: int, turn: Turn, key: tuple) -> None:
        heapq.heappush(self.waiting, (key, self.seq, traj, max(turn.gen, 1), turn.prefill))
        self.seq += 1

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    def step(self) -> Tuple[float, List[int]]:
        prefill = 0
        while self.waiting and (self.slots is None or len(self.running) < self.slots):
            _, _, traj, left, pre = heapq.heappop(self.waiting)
            self.running[traj] = left
            prefill += pre
        dt = self.cost(len(self.running), prefill)
        self.busy += dt
        self.steps += 1
        done = []
        for traj in list(self.running):
            self.running[traj] -= 1
            if self.running[traj] == 0:
                del self.running[traj]
                done.append(traj)
        return dt, done


def _remaining(trace: Trace, traj: int, turn: int, cost: StepCost, retrieval: RetrievalCost) -> float:
    """A trajectory's own chain from ``turn`` on, alone in the engine (the clairvoyant key)."""
    s = 0.0
    for t in trace[traj][turn:]:
        s += max(t.gen, 1) * cost(1, 0) + t.prefill * cost.per_prefill_token
        if t.search:
            s += retrieval(1)
    return s


def simulate(trace: Trace, cost: StepCost, retrieval: RetrievalCost, mode: str = "async", *,
             slots: Optional[int] = None, order="turn", loop_overhead: float = 0.0) -> Result:
    """Replay ``trace`` through the ``mode`` loop ("sync" or "async").

    slots: the engine's ``max_num_seqs`` (None: every request runs at once); order: which waiting
    request the engine admits first, "turn" (earlier turns first, as the agent asks vLLM) or
    "chain" (the longest remaining chain first: a clairvoyant scheduler that knows the trace), or a
    function ``(trajectory, turn) -> key`` (lower first; ties by row);
    loop_overhead: seconds the async loop spends between two engine steps (parsing actions,
    tokenizing observations, submitting), added after every step, not to the engine's busy time.
    """
    if mode not in ("sync", "async") or not (callable(order) or order in ("turn", "chain")):
        raise ValueError(f"simulate: mode must be sync|async and order turn|chain or a function, "
                         f"got {mode!r}, {order!r}")
    if any(len(turns) == 0 for turns in trace):
        raise ValueError("simulate: every trajectory needs at least one turn")
    eng = _Engine(cost, slots)
    chains = [0.0] * len(trace)

    def key(traj: int, turn: int) -> tuple:
        if callable(order):
            return (order(traj, turn), traj)
        if order == "chain":
            return (-_remaining(trace, traj, turn, cost, retrieval), traj)
        return (turn, traj)

    if mode == "sync":
        t = 0.0
        turn_of = [0] * len(trace)
        active = list(range(len(trace)))
        while active:
            start = t
            for i in active:
                eng.submit(i, trace[i][turn_of[i]], key(i, turn_of[i]))
            while not eng.idle:
                t += eng.step()[0]
            for i in active:
                chains[i] += t - start
            searching = [i for i in active if trace[i][turn_of[i]].search]
            if searching:
                dt = retrieval(len(searching))
                t += dt
                for i in searching:
                    chains[i] += dt
            for i in active:
                turn_of[i] += 1
            active = [i for i in active if turn_of[i] < len(trace[i])]
        return Result(t, eng.busy, eng.steps, chains)

    # async: engine steps back to back while it has work; a finished turn that searches joins the
    # retriever's queue (the queries of one step share a call, at most `concurrency` in flight);
    # an observation back during a step is submitted at the next step boundary, at once if idle
    t = 0.0
    turn_of = [0] * len(trace)
    started = [0.0] * len(trace)
    queue: List[int] = []                       # queries waiting for a call slot
    inflight: List[Tuple[float, int, List[int]]] = []   # (done at, seq, trajectories)
    seq = 0
    done = 0

    def launch(now: float) -> None:
        nonlocal seq
        while queue and len(inflight) < retrieval.concurrency:
            batch = list(queue)
            queue.clear()
            heapq.heappush(inflight, (now + retrieval(len(batch)), seq, batch))
            seq += 1

    def submit(i: int, now: float) -> None:
        started[i] = now
        eng.submit(i, trace[i][turn_of[i]], key(i, turn_of[i]))

    for i in range(len(trace)):
        submit(i, 0.0)
    while done < len(trace):
        if eng.idle:
            if not inflight:
                raise RuntimeError("simulate: nothing running and nothing retrieving")  # unreachable
            t = max(t, inflight[0][0])
        else:
            dt, finished = eng.step()
            t += dt + loop_overhead
            for i in finished:
                chains[i] += t - started[i]
                if trace[i][turn_of[i]].search:        # (a last turn's search: its observation hit the budget)
                    started[i] = t
                    queue.append(i)
                elif turn_of[i] + 1 >= len(trace[i]):
                    done += 1
                else:
                    turn_of[i] += 1
                    submit(i, t)
            launch(t)
        while inflight and inflight[0][0] <= t:
            _, _, batch = heapq.heappop(inflight)
            for i in batch:
                chains[i] += t - started[i]
                turn_of[i] += 1
                if turn_of[i] < len(trace[i]):
                    submit(i, t)
                else:
                    done += 1
            launch(t)
    return Result(t, eng.busy, eng.steps, chains)


def trace_of(batch) -> List[List[Turn]]:
    """The trace of a :class:`~tspo_fast.env.batch.RolloutBatch`: per row and turn, the tokens
    prefilled (prompt, or previous turn's sampled tokens + observation), sampled, and whether
    the turn's observation came from a search (observations of invalid actions do not)."""
    trace = []
    for r in range(batch.input_ids.shape[0]):
        turns: List[Turn] = []
        carry = int(batch.prompt_len[r])
        tid, obs, live = batch.turn_id[r], batch.is_obs[r], batch.attention_mask[r].bool()
        for k in range(int(batch.num_turns[r])):
            at_k = (tid == k) & live
            gen = int((at_k & ~obs).sum())
            n_obs = int((at_k & obs).sum())
            text = batch.observation_texts[r][k] if k < len(batch.observation_texts[r]) else ""
            turns.append(Turn(prefill=carry, gen=max(gen, 1), search=text.lstrip().startswith("<information>")))
            carry = gen + n_obs
        trace.append(turns)
    return trace


def fit_step_cost(steps: Sequence[Tuple[int, int, float]]) -> Tuple[StepCost, float]:
    """Least-squares ``StepCost`` from logged steps ``(sequences, prefill tokens, seconds)``;
    returns it and the fit's R^2.  Needs steps of at least two batch sizes."""
    a = np.array([[1.0, s, p] for s, p, _ in steps])
    y = np.array([dt for _, _, dt in steps])
    if np.linalg.matrix_rank(a) < 3:
        a = a[:, :2]
    coef, *_ = np.linalg.lstsq(a, y, rcond=None)
    resid = y - a @ coef
    r2 = 1.0 - float(resid @ resid) / max(float(((y - y.mean()) ** 2).sum()), 1e-30)
    coef = list(coef) + [0.0] * (3 - len(coef))
    return StepCost(float(coef[0]), float(coef[1]), float(coef[2])), r2
