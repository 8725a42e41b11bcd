"""One training update on a random Qwen2 under DeepSpeed ZeRO-3: padded vs packed micro-batches.

    python bench/gpu_update_step.py --out $OUT/update_step.json            # GPU: a ~0.5B Qwen2, bf16
    python bench/gpu_update_step.py --small --out /tmp/u.json               # CPU smoke run (tiny shapes)

The model is Qwen2.5-0.5B's shape (896 hidden, 24 layers, vocabulary 151936) with random
weights; the batch is a search-like length mix (40 rows: prompts of 120 tokens, 90% of the
responses 60-240 tokens, 10% at the 768-token cap).  Per layout (``padded+old``: right-padded
micro-batches of 8 rows plus a pi_old pass; ``packed``: packed under a token budget, pi_old
skipped) it runs one warm-up and ``--rounds`` timed updates (pi_ref pass + PPO step, K3 loss,
ZeRO-3 world size 1) and writes, per layout: seconds of the log-prob and update phases, real
tokens per second, the padding fraction and the peak GPU memory of the phases.

Needs torch, transformers, deepspeed and this repository (the GPU image lacks deepspeed: carry
its wheel and pure-Python dependencies, see bench/device_check.sh).  The rollout (vLLM) is not
part of it: vLLM's wheel is too large to bring to the lent GPU machine.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tspo_fast.config import load_config
from tspo_fast.env.batch import Trajectory, collate
from tspo_fast.models import load_causal_lm
from tspo_fast.models.tiny import TinyModelSpec, build_tiny_model
from tspo_fast.training.builders import build_actor, build_reference
from tspo_fast.training.distributed import init_distributed, shutdown
from tspo_fast.training.ppo import compute_logprobs, plan_update, ppo_update

MODES = {"padded+old": ["train.packing=false", "train.micro_batch_size=8", "train.recompute_old_logp=true"],
         "packed": ["train.packing=true"]}


def length_mix(vocab: int, rows: int = 40, prompt: int = 120, cap: int = 768, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    trajs = []
    for i in range(rows):
        t = Trajectory(torch.randint(0, vocab, (prompt,), generator=g).tolist(), uid=f"q{i // 5}")
        total = cap if i % 10 == 0 else int(torch.randint(60, 240, (1,), generator=g))
        k = 0
        while len(t.response_ids) < total:
            n = min(total - len(t.response_ids), 40)
            t.append(torch.randint(0, vocab, (n,), generator=g).tolist(), k, False, [-1.0] * n)
            m = min(total - len(t.response_ids), 120)
            if m:
                t.append(torch.randint(0, vocab, (m,), generator=g).tolist(), k, True)
            k += 1
        t.num_turns = k
        trajs.append(t)
    batch = collate(trajs, pad_id=0)
    return batch, torch.randn(batch.input_ids.shape, generator=g) * batch.loss_mask


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--small", action="store_true", help="tiny shapes (CPU smoke run)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--work", default="/tmp/gpu_update_step")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    init_distributed()
    spec = (TinyModelSpec(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=128)
            if args.small else TinyModelSpec(hidden_size=896, num_layers=24, num_heads=14, num_kv_heads=2,
                                             intermediate_size=4864, max_position_embeddings=4096))
    folder = os.path.join(args.work, "small" if args.small else "qwen2-0.5b-shape")
    if not os.path.exists(os.path.join(folder, "config.json")):
        build_tiny_model(folder, spec=spec)
        if not args.small:                           # the real vocabulary: the LM head's cost
            lm = load_causal_lm(folder)
            lm.resize_token_embeddings(151936)
            lm.save_pretrained(folder)
    dtype = "bfloat16" if cuda else "float32"
    base = [f"model.path={folder}", f"model.dtype={dtype}", f"train.bf16={str(cuda).lower()}",
            "model.gradient_checkpointing=true", "rollout.n=5", "train.prompts_per_step=8", "train.mini_batch_prompts=8",
            "train.max_tokens_per_micro=8192", "loss.chunk_size=1024", "loss.kl_coef=0.001", "train.lr=1e-6"]
    vocab = load_causal_lm(folder).config.vocab_size
    batch, adv = length_mix(min(vocab, 4096))
    results = {"device": torch.cuda.get_device_name() if cuda else "cpu", "rows": len(batch),
               "tokens": int(batch.attention_mask.sum()), "date": time.strftime("%Y-%m-%d"), "modes": {}}
    for mode, sets in MODES.items():
        cfg = load_config(None, base + sets)
        actor = build_actor(cfg, load_causal_lm(folder, dtype), 1)
        ref = build_reference(cfg, folder, 1)
        rows = []
        for r in range(args.rounds + 1):
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base_mem = torch.cuda.memory_allocated()
            t0 = time.perf_counter()
            plan = plan_update(batch, adv, cfg, actor.device)
            if not plan.on_policy:
                compute_logprobs(actor, plan, "old_logp")
            compute_logprobs(ref, plan, "ref_logp")
            if cuda:
                torch.cuda.synchronize()
            t1 = time.perf_counter()
            ppo_update(actor, plan, cfg)
            if cuda:
                torch.cuda.synchronize()
            t2 = time.perf_counter()
            peak = (torch.cuda.max_memory_allocated() - base_mem) / 2 ** 30 if cuda else float("nan")
            if r:                                      # round 0 warms up
                rows.append(dict(logprobs_s=t1 - t0, update_s=t2 - t1, peak_gib=peak))
        mean = {k: sum(x[k] for x in rows) / len(rows) for k in rows[0]}
        mean.update(tokens_per_s=plan.tokens / (mean["logprobs_s"] + mean["update_s"]),
                    padding_frac=1 - plan.tokens / plan.slots, micro_batches=len(plan.micro()))
        results["modes"][mode] = mean
        print(mode, {k: round(v, 4) for k, v in mean.items()}, flush=True)
        del actor, ref
        if cuda:
            torch.cuda.empty_cache()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
