"""Rollout wall time, async vs sync agent loop, with a real retrieval server on loopback.

The embedded default's rollout (``configs/tiny.yaml``: the shipped warm-start policy, 8 prompts
x 5, vLLM in-process) against ``tspo-fast retriever serve``'s app (BM25 over the bundled world)
in a background uvicorn server, its every request delayed by 0, 50 or 200 ms (a slow or remote
search engine), and a long-tail length mix (turns of up to 192 new tokens instead of 64, so a
few rows run much longer than the rest).  Reported per case: rollout seconds, the share of it
the engine was generating (``engine_busy_frac``), time the loop waited on retrieval with nothing
to generate, generated tokens per second.

Run: ``python -m pytest bench/test_bench_async.py --benchmark-only -s``.
"""
from __future__ import annotations

import os
import sys
import time

import pytest

from tspo_fast.config import load_config
from tspo_fast.data import prompt_items
from tspo_fast.models import load_tokenizer, resolve_model_path
from tspo_fast.retrieval.bundled import bundled_index
from tspo_fast.retrieval.http import HTTPRetriever
from tspo_fast.retrieval.inprocess import InProcessRetriever
from tspo_fast.retrieval.server import BackgroundServer, create_app
from tspo_fast.training.builders import build_agent, build_engine, load_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Delayed:
    """The in-process retriever behind the server, each request ``delay_s`` slower."""

    def __init__(self, inner, delay_s):
        self.inner, self.delay_s = inner, delay_s

    def search(self, queries, topk):
        time.sleep(self.delay_s)
        return self.inner.search(queries, topk)

    def info(self):
        return self.inner.info()


@pytest.fixture(scope="module")
def setup():
    pytest.importorskip("vllm")
    cfg = load_config(os.path.join(ROOT, "configs", "tiny.yaml"), ["rollout.engine=vllm"])
    path = resolve_model_path(cfg.model.path)
    tok = load_tokenizer(path)
    engine = build_engine(cfg, path)
    train, _ = load_data(cfg)
    inner = InProcessRetriever.from_dir(bundled_index("bm25"))
    yield cfg, tok, engine, prompt_items(train[:cfg.train.prompts_per_step], tok), inner
    engine.close()


@pytest.mark.parametrize("case", ["default", "long_tail"])
@pytest.mark.parametrize("delay_ms", [0, 50, 200])
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_bench_rollout_loop(benchmark, setup, mode, delay_ms, case):
    cfg, tok, engine, items, inner = setup
    if case == "long_tail" and delay_ms != 50:
        pytest.skip("the long-tail mix is measured at 50 ms")
    cfg.rollout.mode = mode
    if case == "long_tail":
        cfg.rollout.max_new_tokens_per_turn = 192
    stats = {}
    with BackgroundServer(create_app(_Delayed(inner, delay_ms / 1000.0))) as server:
        agent = build_agent(cfg, engine, HTTPRetriever(server.url, timeout_s=30, retries=0), tok)
        seeds = iter(range(100))

        def run():
            b = agent.rollout(items, seed=next(seeds))
            stats.update(b.stats)

        benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update({
        "rollout_s": round(stats["total_seconds"], 3), "engine_busy_frac": round(stats["engine_busy_frac"], 3),
        "retrieval_wait_s": round(stats["retrieval_wait_seconds"], 3),
        "gen_tokens_per_s": round(stats["generated_tokens"] / stats["total_seconds"], 1),
        "retrieval_calls": stats["retrieval_calls"], "searches": stats["search_queries"]})
    print(f"\n{case} {delay_ms} ms {mode}: " + ", ".join(f"{k}={v}" for k, v in benchmark.extra_info.items()),
          file=sys.stderr)
