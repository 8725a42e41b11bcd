"""Rollout wall time, async vs sync agent loop, with a real retrieval server on loopback.

The embedded default's rollout (``configs/tiny.yaml``: the shipped warm-start policy, 8 prompts
x 5, vLLM in-process) against ``tspo-fast retriever serve``'s app (BM25 over the bundled world)
in its own process (``bench/slow_server.py``, uvicorn on loopback), its every request delayed by
0, 50 or 200 ms (a slow or remote search engine), and a long-tail length mix (turns of up to 192 new tokens instead of 64, so a
few rows run much longer than the rest).  Reported per case: rollout seconds, the share of it
the engine was generating (``engine_busy_frac``), time the loop waited on retrieval with nothing
to generate, generated tokens per second, and the critical path (the slowest trajectory's own
engine + retrieval seconds: no loop can finish sooner).  Each case runs with vLLM's default
number of engine slots and with 8 (more trajectories than slots).

Run: ``python -m pytest bench/test_bench_async.py --benchmark-only -s`` (``BENCH_DELAYS_MS=200``
to measure one latency only).
"""
from __future__ import annotations

import copy
import os
import sys

import pytest
from embedded import embedded_vllm
from slow_server import SlowServer

from tspo_fast.data import prompt_items
from tspo_fast.retrieval.http import HTTPRetriever
from tspo_fast.training.builders import build_agent


@pytest.fixture(scope="module", params=[None, 8], ids=["slots_default", "slots_8"])
def setup(request):
    """The engine with vLLM's default number of sequences decoded at once (all 40 trajectories
    fit), or with 8: more trajectories than engine slots, as at Search-R1's sizes on a GPU
    (512 prompts x 5 against vLLM's few hundred), where another trajectory can use the engine
    while one waits on retrieval.  One engine at a time: pytest closes one before the next."""
    pytest.importorskip("vllm")
    cfg, tok, engine, train = embedded_vllm(request.param)
    yield cfg, tok, engine, prompt_items(train[:cfg.train.prompts_per_step], tok)
    engine.close()


@pytest.mark.parametrize("case", ["default", "long_tail"])
@pytest.mark.parametrize("delay_ms", [int(d) for d in os.environ.get("BENCH_DELAYS_MS", "0,50,200").split(",")])
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_bench_rollout_loop(benchmark, setup, mode, delay_ms, case):
    cfg, tok, engine, items = setup
    cfg = copy.deepcopy(cfg)            # each case sets its own mode and turn length
    if case == "long_tail" and delay_ms != 50:
        pytest.skip("the long-tail mix is measured at 50 ms")
    if cfg.rollout.max_num_seqs is not None and case == "long_tail":
        pytest.skip("with 8 engine slots only the default mix is measured")
    cfg.rollout.mode = mode
    if case == "long_tail":
        cfg.rollout.max_new_tokens_per_turn = 192
    rounds = []
    with SlowServer(delay_ms) as server:
        agent = build_agent(cfg, engine, HTTPRetriever(server.url, timeout_s=30, retries=0), tok)
        seeds = iter(range(100))

        def run():
            rounds.append(agent.rollout(items, seed=next(seeds)).stats.as_dict())

        benchmark.pedantic(run, rounds=8, iterations=1, warmup_rounds=1)
    rounds = rounds[1:]                 # the warm-up round
    mean = {k: sum(r[k] for r in rounds) / len(rounds) for k in rounds[0]}
    benchmark.extra_info.update({      # means over the measured rounds
        "rollout_s": round(mean["total_seconds"], 3), "engine_busy_frac": round(mean["engine_busy_frac"], 3),
        "retrieval_wait_s": round(mean["retrieval_wait_seconds"], 3),
        "gen_tokens_per_s": round(mean["generated_tokens"] / mean["total_seconds"], 1),
        "retrieval_calls": round(mean["retrieval_calls"], 1), "searches": round(mean["search_queries"], 1),
        "critical_path_s": round(mean["critical_path_seconds"], 3),
        "critical_retrieval_s": round(mean["critical_retrieval_seconds"], 3),
        "critical_tokens": round(mean["critical_tokens"], 1)})
    slots = cfg.rollout.max_num_seqs or "default"
    print(f"\n{case} slots={slots} {delay_ms} ms {mode}: " + ", ".join(f"{k}={v}" for k, v in benchmark.extra_info.items()),
          file=sys.stderr)
