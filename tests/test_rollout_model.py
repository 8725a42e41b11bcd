"""The discrete-event model of the rollout loops (tspo_fast/env/rollout_model.py) against hand-worked cases.

The model prices what the async loop can win on a trace; these cases are small enough to work
out on paper, so a wrong barrier, admission order, retrieval queue or step boundary shows.
"""
import random

import pytest

from tspo_fast.env.batch import Trajectory, collate
from tspo_fast.env.rollout_model import RetrievalCost, StepCost, Turn, fit_step_cost, simulate, trace_of

UNIT = StepCost(1.0, 0.0)          # every step costs 1 s whatever runs in it


def test_one_trajectory_is_its_own_chain_in_both_loops():
    trace = [[Turn(10, 5, True), Turn(3, 4, False)]]
    for mode in ("sync", "async"):
        r = simulate(trace, UNIT, RetrievalCost(10.0), mode)
        assert r.total == 19 and r.chains == [19] and r.steps == 9 and r.engine_busy == 9


def test_barrier_against_overlap():
    # A searches after a 2-token turn, then answers in 2; B answers after 6 tokens.
    trace = [[Turn(1, 2, True), Turn(1, 2, False)], [Turn(1, 6, False)]]
    ret = RetrievalCost(3.0)
    sync = simulate(trace, UNIT, ret, "sync")
    assert sync.total == 6 + 3 + 2                       # turn 0 waits for B, then the search, then A's turn 1
    assert sync.chains == [11, 6]
    asy = simulate(trace, UNIT, ret, "async")
    # A: steps 1-2, search until t=5 (B decoding meanwhile), resubmitted at the step boundary 5,
    # its 2 tokens at steps 6-7; B ends at step 6
    assert asy.total == 7 and asy.chains == [7, 6] and asy.steps == 7


def test_costs_per_sequence_and_prefill():
    trace = [[Turn(4, 2, False)], [Turn(0, 1, False)]]
    r = simulate(trace, StepCost(0.0, 1.0, 0.5), RetrievalCost(0.0), "async")
    assert r.total == (2 + 0.5 * 4) + 1                 # step 1: two sequences + 4 prefill tokens; step 2: one
    assert r.engine_busy == r.total
    r = simulate(trace, StepCost(0.0, 1.0), RetrievalCost(0.0), "async", loop_overhead=0.25)
    assert r.total == 3 + 2 * 0.25 and r.engine_busy == 3


def test_admission_order_with_few_slots():
    trace = [[Turn(0, 1, False)], [Turn(0, 2, False)], [Turn(0, 3, False)]]
    turn = simulate(trace, UNIT, RetrievalCost(0.0), "async", slots=1, order="turn")
    chain = simulate(trace, UNIT, RetrievalCost(0.0), "async", slots=1, order="chain")
    assert turn.total == chain.total == 6
    assert turn.chains == [1, 3, 6]                    # ties broken by row: shortest first
    assert chain.chains == [6, 5, 3]                   # the longest remaining chain first
    mine = simulate(trace, UNIT, RetrievalCost(0.0), "async", slots=1, order=lambda i, k: -i)
    assert mine.chains == [6, 5, 3]                    # a function's key: lower first


def test_retrieval_concurrency_queues_calls():
    trace = [[Turn(0, g, True), Turn(0, 1, False)] for g in (1, 2, 3)]
    one = simulate(trace, UNIT, RetrievalCost(10.0, concurrency=1), "async")
    # A's call 1..11; B and C wait and share the next call 11..21; A ends at 12, B and C at 22
    assert one.total == 22 and one.chains == [12, 22, 22]
    many = simulate(trace, UNIT, RetrievalCost(10.0, concurrency=8), "async")
    assert many.total == 14                          # calls end at 11, 12, 13, each turn 1 right after
    assert simulate(trace, UNIT, RetrievalCost(10.0), "sync").total == 3 + 10 + 1


def test_retrieval_cost_per_call_and_query():
    trace = [[Turn(0, 1, True), Turn(0, 1, False)] for _ in range(3)]
    assert simulate(trace, UNIT, RetrievalCost(2.0, per_call=1.0, per_query=0.5), "sync").total == 1 + 4.5 + 1


@pytest.mark.parametrize("seed", range(5))
def test_random_traces_bounds(seed):
    """Unit step cost, unlimited slots, integer latency: every search returns on a step boundary, so
    the async loop ends exactly with its longest trajectory alone, and the sync loop never sooner."""
    rng = random.Random(seed)
    lat = rng.randint(0, 6)
    trace = []
    for _ in range(rng.randint(1, 12)):
        n = rng.randint(1, 4)
        trace.append([Turn(rng.randint(0, 9), rng.randint(1, 9), k < n - 1 and rng.random() < 0.8) for k in range(n)])
    alone = [sum(t.gen + lat * t.search for t in turns) for turns in trace]
    asy = simulate(trace, UNIT, RetrievalCost(float(lat)), "async")
    sync = simulate(trace, UNIT, RetrievalCost(float(lat)), "sync")
    assert asy.total == max(alone) and asy.chains == alone
    assert sync.total >= asy.total
    assert asy.engine_busy == asy.steps
    sync_expected = 0
    for k in range(max(len(t) for t in trace)):
        live = [turns[k] for turns in trace if len(turns) > k]
        sync_expected += max(t.gen for t in live) + lat * any(t.search for t in live)
    assert sync.total == sync_expected


def test_trace_of_a_rollout_batch():
    a = Trajectory([1, 2, 3], "q1")
    a.append([10, 11], 0, obs=False, logps=[0.0, 0.0])
    a.append([20, 21, 22], 0, obs=True)
    a.append([12], 1, obs=False, logps=[0.0])
    a.action_texts, a.observation_texts, a.num_turns = ["s", "a"], ["\n\n<information>d</information>\n\n", ""], 2
    b = Trajectory([1, 2], "q2")
    b.append([13, 14, 15], 0, obs=False, logps=[0.0] * 3)
    b.append([23], 0, obs=True)                      # an invalid action's correction: no search
    b.append([16], 1, obs=False, logps=[0.0])
    b.action_texts, b.observation_texts, b.num_turns = ["x", "a"], ["\nMy previous action is invalid.\n", ""], 2
    batch = collate([a, b], pad_id=0, pad_to_multiple=8)
    assert trace_of(batch) == [[Turn(3, 2, True), Turn(5, 1, False)],
                               [Turn(2, 3, False), Turn(4, 1, False)]]


def test_fit_recovers_the_step_cost():
    rng = random.Random(0)
    true = StepCost(0.002, 0.00007, 0.000005)
    steps = [(s, p, true(s, p)) for s, p in ((rng.randint(1, 40), rng.choice([0, 0, 0, rng.randint(1, 900)]))
                                             for _ in range(200))]
    fit, r2 = fit_step_cost(steps)
    assert r2 == pytest.approx(1.0)
    assert (fit.base, fit.per_seq, fit.per_prefill_token) == pytest.approx(
        (true.base, true.per_seq, true.per_prefill_token), rel=1e-6)
    fit, _ = fit_step_cost([(s, 0, true(s, 0)) for s in range(1, 9)])   # no prefill data: that term is 0
    assert fit.per_prefill_token == 0.0 and fit.per_seq == pytest.approx(true.per_seq)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="mode"):
        simulate([[Turn(0, 1, False)]], UNIT, RetrievalCost(0.0), "bulk")
    with pytest.raises(ValueError, match="at least one turn"):
        simulate([[]], UNIT, RetrievalCost(0.0), "sync")
