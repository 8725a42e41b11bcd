"""The trainer's passes over one step of configs/smollm2.yaml, timed alone (no rollout), CPU.

    python bench/smollm2_passes.py --repeats 3 --out runs/smollm2_passes.json

One DeepSpeed ZeRO-3 actor (world size 1) of SmolLM2-135M-Instruct with the shipped warm start
and LoRA on the top 16 of 30 layers, as ``tspo-fast train --config configs/smollm2.yaml`` builds
it, and one step's batch shaped like that config's (``--groups`` prompts of ``--prompt-tokens``
tokens, ``rollout.n`` = 5 answers each, answer lengths drawn from ``--answer-tokens``, half of
each answer loss-masked as an observation; random token ids: the timings depend on shapes only).
The passes of a step with the KL pass kept (``--kl``, default 0.001; 0: as the config ships, no log-prob pass):

* **log-probs**: pi_ref, the adapters switched off (``compute_logprobs`` under ``disabled_adapters``);
* **update**: one PPO epoch, forward + backward + optimizer step (``ppo_update``);
* **health**: the guard's forward on the first micro-batch (``update_kl``).

in four layouts, interleaved ``--repeats`` times so that drift of the machine falls on all alike:
``plain`` (``model.lora.share_frozen: false``, rows packed), ``share_frozen`` (the default: the
frozen layers' output computed once, by the first pass), ``share_prompts`` (each group's prompt
once) and ``both``.  Reported: each pass's median seconds, the tokens through the model, and the
ratios to ``plain``.  Every timing depends on what else the machine runs: the load average is
recorded before and after.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time

import torch

from tspo_fast.config import load_config
from tspo_fast.env.batch import Trajectory, collate
from tspo_fast.models import load_policy
from tspo_fast.training.builders import build_actor
from tspo_fast.training.distributed import init_distributed
from tspo_fast.training.guard import update_kl
from tspo_fast.training.lora import disabled_adapters
from tspo_fast.training.ppo import compute_logprobs, plan_update, ppo_update

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LAYOUTS = {"plain": (False, False), "share_frozen": (True, False), "share_prompts": (False, True),
           "both": (True, True)}


def step_batch(vocab: int, groups: int, n: int, prompt_tokens: int, answer: tuple, seed: int = 0):
    """``groups`` prompts x ``n`` answers: per answer one action, one observation (masked), one
    action (the answer); lengths uniform in ``answer``."""
    g = torch.Generator().manual_seed(seed)
    ids = lambda k: torch.randint(0, vocab, (k,), generator=g).tolist()
    trajs = []
    for q in range(groups):
        prompt = ids(prompt_tokens)
        for _ in range(n):
            total = int(torch.randint(answer[0], answer[1] + 1, (1,), generator=g))
            t = Trajectory(list(prompt), uid=f"q{q}")
            t.append(ids(total // 4), 0, False)
            t.append(ids(total // 2), 0, True)
            t.append(ids(total - total // 4 - total // 2), 1, False)
            t.num_turns = 2
            trajs.append(t)
    batch = collate(trajs, pad_id=0)
    batch.rollout_logp = torch.where(batch.loss_mask, -torch.rand(batch.loss_mask.shape, generator=g),
                                     torch.zeros(()))
    return batch


def step_passes(actor, plan, cfg) -> dict:
    """Seconds of the step's log-prob pass (pi_ref; none without KL), update and health check, in the
    trainer's order."""
    t0 = time.perf_counter()
    if cfg.loss.kl_coef > 0:
        with disabled_adapters(actor.module.lm):
            compute_logprobs(actor, plan, "ref_logp")
    t1 = time.perf_counter()
    stats = ppo_update(actor, plan, cfg)
    t2 = time.perf_counter()
    update_kl(actor, plan.micro()[0], stats.before_logp)
    t3 = time.perf_counter()
    return {"logprobs": t1 - t0, "update": t2 - t1, "health": t3 - t2, "tokens": plan.tokens}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--groups", type=int, default=4)
    ap.add_argument("--prompt-tokens", type=int, default=155)
    ap.add_argument("--answer-tokens", type=int, nargs=2, default=(30, 110))
    ap.add_argument("--kl", type=float, default=0.001, help="loss.kl_coef (0: no log-prob pass, as the config ships)")
    ap.add_argument("--out", default=os.path.join(ROOT, "runs", "smollm2_passes.json"))
    args = ap.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)
    init_distributed()
    base = load_config(os.path.join(ROOT, "configs", "smollm2.yaml"),
                       [f"loss.kl_coef={args.kl}", "train.share_prompts=true", f"train.prompts_per_step={args.groups}",
                        f"train.mini_batch_prompts={args.groups}"])
    _, _, lm = load_policy(base.model.path, base.model.dtype)
    actor = build_actor(base, lm, gas=1)        # share_prompts=True: the SDPA implementation in every layout
    depth = actor.module.frozen_trunk
    batch = step_batch(lm.config.vocab_size, args.groups, base.rollout.n, args.prompt_tokens, tuple(args.answer_tokens))
    token_adv = torch.randn(batch.loss_mask.shape, generator=torch.Generator().manual_seed(1)) * batch.loss_mask
    result = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": platform.node(),
              "torch": torch.__version__, "loadavg_before": os.getloadavg(), "frozen_trunk": depth,
              "rows": len(batch), "real_tokens": int(batch.attention_mask.sum()), "times": {}}
    for rep in range(args.repeats + 1):             # repeat 0: warm-up, not recorded
        for name, (frozen, prompts) in LAYOUTS.items():
            cfg = load_config(os.path.join(ROOT, "configs", "smollm2.yaml"),
                              [f"loss.kl_coef={args.kl}", f"train.share_prompts={str(prompts).lower()}",
                               f"train.prompts_per_step={args.groups}", f"train.mini_batch_prompts={args.groups}"])
            actor.module.frozen_trunk = depth if frozen else 0
            t = step_passes(actor, plan_update(batch, token_adv, cfg, actor.device), cfg)
            print(rep, name, json.dumps({k: round(v, 3) for k, v in t.items()}), flush=True)
            if rep:
                result["times"].setdefault(name, []).append(t)
    actor.module.frozen_trunk = depth
    summary = {}
    for name, runs in result["times"].items():
        med = {k: statistics.median(r[k] for r in runs) for k in ("logprobs", "update", "health")}
        med["logprobs+update"] = statistics.median(r["logprobs"] + r["update"] for r in runs)
        med["tokens"] = runs[0]["tokens"]
        summary[name] = med
    for med in summary.values():
        med["vs_plain"] = {k: summary["plain"][k] / med[k] for k in ("logprobs", "update", "health", "logprobs+update")
                           if med[k] > 0.05}
    result["median_s"] = summary
    result["loadavg_after"] = os.getloadavg()
    print(json.dumps(summary, indent=1))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
