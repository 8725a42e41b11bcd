"""The log-prob + update phases of one training step, padded vs packed (CPU; GPU when present).

Two batches: the embedded default's (one real rollout of ``configs/tiny.yaml``'s 8 prompts x 5
with the shipped warm-start policy, HF engine), and a long-tail length mix (40 rows, 10% at the
768-token response cap).  Two ways of running them through the same DeepSpeed ZeRO-3 actor and
reference (world size 1):

* ``padded+old``: what the trainer did before packing — right-padded micro-batches of 8 rows and
  a pi_old pass even when the update is exactly on-policy;
* ``packed``: rows packed under ``train.max_tokens_per_micro`` tokens, pi_old skipped (one
  mini-batch, one epoch: K3 takes pi_old = pi).

Reported per case (``extra_info``): seconds of the log-prob and update phases, real tokens per
second, the padding fraction of what ran through the model, and the peak resident memory above
the start of the phase (sampled).  Run: ``python -m pytest bench/test_bench_update.py --benchmark-only -s``.
"""
from __future__ import annotations

import os
import sys
import threading
import time

import psutil
import pytest
import torch
from gpu_update_step import length_mix  # the same long-tail batch as the GPU script (bench/ is on sys.path)

from tspo_fast.algo.advantages import AdvantageSettings, batch_advantages
from tspo_fast.algo.rewards import score_batch
from tspo_fast.config import load_config
from tspo_fast.data import prompt_items
from tspo_fast.models import load_policy
from tspo_fast.training.builders import (
    build_actor,
    build_agent,
    build_engine,
    build_reference,
    build_retriever,
    load_data,
)
from tspo_fast.training.distributed import init_distributed
from tspo_fast.training.ppo import compute_logprobs, plan_update, ppo_update

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = {"padded+old": ["train.packing=false", "train.recompute_old_logp=true"], "packed": ["train.packing=true"]}


def _cfg(extra=()):
    return load_config(os.path.join(ROOT, "configs", "tiny.yaml"), ["rollout.engine=hf", *extra])


@pytest.fixture(scope="module")
def parts():
    init_distributed()
    cfg = _cfg()
    path, tok, lm = load_policy(cfg.model.path, cfg.model.dtype)
    train, _ = load_data(cfg)
    agent = build_agent(cfg, build_engine(cfg, path), build_retriever(cfg.retrieval), tok)
    batch = agent.rollout(prompt_items(train[:cfg.train.prompts_per_step], tok), seed=1)
    outcome, first = score_batch(batch, tok)
    adv, _ = batch_advantages(batch, outcome, first, AdvantageSettings.from_config(cfg))
    return {"path": path, "lm": lm, "default": (batch, adv), "long_tail": length_mix(lm.config.vocab_size)}


class _PeakRSS:
    """Peak memory of the phase: on CUDA ``max_memory_allocated`` above the start; on CPU the
    resident memory above the start, sampled every 5 ms (after the warm-up round the CPU
    allocator reuses what it holds, so this shows only growth: read CPU figures as a lower bound)."""

    def __enter__(self):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            self.cuda_base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        self.proc, self.base, self.peak, self.run = psutil.Process(), psutil.Process().memory_info().rss, 0, True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.run:
            self.peak = max(self.peak, self.proc.memory_info().rss - self.base)
            time.sleep(0.005)

    def __exit__(self, *exc):
        self.run = False
        self.thread.join()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.cuda_base


@pytest.mark.parametrize("case", ["default", "long_tail"])
@pytest.mark.parametrize("mode", list(MODES))
def test_bench_update_phases(benchmark, parts, case, mode):
    cfg = _cfg(MODES[mode])
    actor = build_actor(cfg, load_policy(cfg.model.path, cfg.model.dtype)[2], 1)
    ref = build_reference(cfg, parts["path"], 1)
    batch, adv = parts[case]
    times = {}

    def step():
        with _PeakRSS() as mem:
            t0 = time.perf_counter()
            plan = plan_update(batch, adv, cfg, actor.device)
            if not plan.on_policy:
                compute_logprobs(actor, plan, "old_logp")
            compute_logprobs(ref, plan, "ref_logp")
            t1 = time.perf_counter()
            ppo_update(actor, plan, cfg)
            t2 = time.perf_counter()
        times.update(logprobs=t1 - t0, update=t2 - t1, tokens=plan.tokens, slots=plan.slots, peak=mem.peak)

    benchmark.pedantic(step, rounds=3, iterations=1, warmup_rounds=1)
    total = times["logprobs"] + times["update"]
    benchmark.extra_info.update({
        "logprobs_s": round(times["logprobs"], 3), "update_s": round(times["update"], 3),
        "tokens_per_s": round(times["tokens"] / total, 1), "padding_frac": round(1 - times["tokens"] / times["slots"], 3),
        "peak_mem_mb": round(times["peak"] / 2 ** 20, 1), "rows": len(batch), "tokens": times["tokens"]})
    print(f"\n{case} {mode}: " + ", ".join(f"{k}={v}" for k, v in benchmark.extra_info.items()), file=sys.stderr)
