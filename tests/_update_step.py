"""One PPO update on a fixed batch; writes the updated weights.  Run directly or with torchrun:

    torchrun --nproc_per_node 2 tests/_update_step.py --model DIR --micro 1 --out W.pt

Every rank builds the same global batch and trains on its contiguous share of the rows; the
test compares the weights across world sizes and micro-batch splits.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch


def fixed_batch(vocab: int, rows: int = 8, seed: int = 0):
    from tspo_fast.env.batch import Trajectory, collate
    g = torch.Generator().manual_seed(seed)
    trajs = []
    for i in range(rows):
        t = Trajectory(prompt_ids=torch.randint(0, vocab, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g).tolist(),
                       uid=f"q{i // 2}")
        for k in range(int(torch.randint(1, 3, (1,), generator=g))):
            t.append(torch.randint(0, vocab, (int(torch.randint(2, 7, (1,), generator=g)),), generator=g).tolist(), k, False)
            t.append(torch.randint(0, vocab, (3,), generator=g).tolist(), k, True)
            t.num_turns = k + 1
        trajs.append(t)
    batch = collate(trajs, pad_id=0)
    adv = torch.randn(batch.input_ids.shape, generator=g) * batch.loss_mask
    return batch, adv, g


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--micro", type=int, default=1, help="rows per micro-batch (padded) ")
    ap.add_argument("--out", default=None)
    ap.add_argument("--agg", default="token_mean")
    ap.add_argument("--packing", type=int, default=0, help="token budget per packed micro-batch (0: padded)")
    ap.add_argument("--lora", type=int, default=0, help="LoRA rank (0: the full model)")
    ap.add_argument("--case", action="append", default=[], metavar="AGG,MICRO,PACKING,OUT",
                    help="one update each, in this process, from the same start (instead of the flags above); "
                         "repeat: one launch, several updates")
    ap.add_argument("--local_rank", type=int, default=None)
    args = ap.parse_args()
    from tspo_fast.training.distributed import init_distributed, shutdown

    init_distributed()
    cases = [c.split(",") for c in args.case] or [(args.agg, args.micro, args.packing, args.out)]
    for agg, micro, packing, out in cases:
        update(args.model, agg, int(micro), int(packing), args.lora, out)
    shutdown()


def update(model: str, agg: str, micro: int, budget: int, lora: int, out: str) -> None:
    """One update from the model's weights; rank 0 writes the updated weights to ``out``."""
    import deepspeed

    from tspo_fast.config import load_config
    from tspo_fast.env.batch import RolloutBatch
    from tspo_fast.models import load_causal_lm
    from tspo_fast.training.distributed import rank, world_size
    from tspo_fast.training.policy import FusedHeadPolicy
    from tspo_fast.training.ppo import ds_config, gradient_accumulation_steps, plan_update, ppo_update

    packing = [f"train.packing={bool(budget)}"] + ([f"train.max_tokens_per_micro={budget}"] if budget else [])
    cfg = load_config(None, ["rollout.n=2", "train.prompts_per_step=4", "train.mini_batch_prompts=4",
                             f"train.micro_batch_size={micro}", "loss.kl_coef=0.1", "loss.chunk_size=16",
                             f"loss.agg={agg}", f"model.lora.rank={lora}", *packing])
    gas = gradient_accumulation_steps(cfg, world_size())
    torch.manual_seed(0)
    lm = load_causal_lm(model)
    if lora:
        from tspo_fast.training.lora import apply_lora
        torch.manual_seed(1)
        lm = apply_lora(lm, cfg.model.lora)
        for name, p in lm.named_parameters():        # B starts at 0: give the adapters a start
            if "lora_B" in name:
                p.data.normal_(0, 0.05)
    policy = FusedHeadPolicy(lm, chunk_size=cfg.loss.chunk_size, packing=cfg.train.packing)
    trainable = [p for p in policy.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=policy, optimizer=torch.optim.SGD(trainable, lr=0.5),
                                      config=ds_config(cfg, gas))
    batch, adv, g = fixed_batch(load_causal_lm(model).config.vocab_size)
    # pi_old and pi_ref of the whole batch: the initial weights, padded, one plain forward on every
    # rank (no collective), perturbed so that some tokens clip
    with torch.no_grad():
        full_old, _ = FusedHeadPolicy(load_causal_lm(model), chunk_size=16).eval()(
            batch.input_ids, batch.attention_mask, batch.loss_mask, mode="logprobs")
    old = full_old + 0.3 * torch.randn(full_old.shape, generator=g) * batch.loss_mask
    ref = old + 0.2 * torch.randn(old.shape, generator=g) * batch.loss_mask
    per = len(batch) // world_size()
    sl = slice(rank() * per, (rank() + 1) * per)
    part = RolloutBatch(**{k: getattr(batch, k)[sl] for k in RolloutBatch._TENSORS},
                        uids=batch.uids[sl], answer_text=batch.answer_text[sl], action_texts=batch.action_texts[sl],
                        observation_texts=batch.observation_texts[sl], aliases=batch.aliases[sl],
                        data_source=batch.data_source[sl])
    plan = plan_update(part, adv[sl], cfg, engine.device)
    plan.on_policy = False                        # use the perturbed pi_old
    for mb in plan.micro():
        mb.old_logp, mb.ref_logp = mb.take(old[sl]), mb.take(ref[sl])
    ppo_update(engine, plan, cfg)
    state = {}
    for name, p in engine.module.named_parameters():
        with deepspeed.zero.GatheredParameters([p]):
            state[name] = p.detach().clone()
    if rank() == 0:
        torch.save(state, out)
    engine.destroy()


if __name__ == "__main__":
    from _worker import run_worker
    run_worker(main)
