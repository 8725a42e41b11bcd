"""Where an async rollout's time goes: vLLM's step time by batch size, and one rollout step by step.

``python bench/rollout_timeline.py [--delay-ms 50]`` (CPU or GPU, the embedded default's engine:
``configs/tiny.yaml`` with vLLM, the shipped warm start, 8 prompts x 5):

1. step time for 1, 8 and 40 sequences decoding 64 tokens (same prompts, one ``generate`` call
   each, after a warm-up call): how much a step's cost depends on how many sequences share it;
2. one asynchronous rollout against the in-process BM25 retriever with every call ``delay-ms``
   slower, each engine step logged (time since the start, step time, requests in the engine,
   requests finished), then the trajectories' turns and searches and the rollout's stats;
3. the mean rollout time of 5 async and 5 sync rollouts (seeds 1-5).
"""
from __future__ import annotations

import argparse
import copy
import time

from embedded import embedded_vllm
from slow_server import Delayed

from tspo_fast.data import prompt_items
from tspo_fast.engines.base import SamplingConfig
from tspo_fast.retrieval.bundled import bundled_index
from tspo_fast.retrieval.inprocess import InProcessRetriever
from tspo_fast.training.builders import build_agent


def step_times(engine, items) -> None:
    sampling = SamplingConfig(temperature=1.0, top_p=1.0, max_new_tokens=64, stop=(), seed=None)
    for n in (1, 8, 40):
        prompts = [it.prompt_ids for it in items[:n]]
        engine.generate(prompts, sampling)
        t = time.perf_counter()
        gens = engine.generate(prompts, sampling)
        dt = time.perf_counter() - t
        steps = max(len(g.token_ids) for g in gens)
        print(f"{n:3d} sequences: {dt / steps * 1000:.2f} ms per step over {steps} steps")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--delay-ms", type=float, default=50.0)
    args = ap.parse_args()
    cfg, tok, engine, train = embedded_vllm()
    retriever = Delayed(InProcessRetriever.from_dir(bundled_index("bm25")), args.delay_ms / 1000.0)
    step_times(engine, prompt_items(train[:40], tok))

    items = prompt_items(train[:cfg.train.prompts_per_step], tok)
    log = []
    step = engine.step

    def logged_step():
        t, n = time.perf_counter(), engine.num_pending()
        out = step()
        log.append((t, time.perf_counter() - t, n, len(out)))
        return out

    engine.step = logged_step
    means = {}
    for mode in ("async", "sync"):
        c = copy.deepcopy(cfg)
        c.rollout.mode = mode
        agent = build_agent(c, engine, retriever, tok)
        agent.rollout(items, seed=0)                      # warm-up
        if mode == "async":
            log.clear()
            b = agent.rollout(items, seed=0)
            print(f"\none async rollout at {args.delay_ms:g} ms, step by step:")
            for t, dt, n, f in log:
                print(f"{(t - log[0][0]) * 1000:7.1f} ms  step {dt * 1000:5.1f} ms  in engine {n:3d}  finished {f}")
            print("turns    ", b.num_turns.tolist())
            print("searches ", b.num_searches.tolist())
            print({k: round(v, 3) for k, v in b.stats.as_dict().items()})
        times = [agent.rollout(items, seed=s).stats.total_seconds for s in range(1, 6)]
        means[mode] = sum(times) / len(times)
    print(f"\nmean rollout (seeds 1-5): async {means['async']:.3f} s, sync {means['sync']:.3f} s")
    engine.close()


if __name__ == "__main__":
    main()
