"""World-size-2 weight sync check, run by ``torchrun --nproc_per_node 2`` from test_sync.py.

Every rank: DeepSpeed ZeRO-3 engine (gloo), then its own in-process vLLM engine
(``external_launcher``); an optimizer step; ``sync_weights`` on both ranks (the gathers are
collectives); each rank's vLLM greedy output must equal HF on the consolidated weights.
argv: model folder, output folder (rank r writes ok_r.txt).
"""
import os
import sys

import torch


def main(model_dir: str, out_dir: str) -> None:
    import deepspeed
    from _tiny import KeywordRetriever
    from transformers import AutoModelForCausalLM

    from tspo_fast.config import load_config
    from tspo_fast.data import PromptItem
    from tspo_fast.engines import SamplingConfig, build_engine
    from tspo_fast.engines.hf import HFEngine
    from tspo_fast.engines.sync import sync_weights
    from tspo_fast.env.agent import SearchAgent
    from tspo_fast.models.tiny import load_tokenizer

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    cfg = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
           "zero_allow_untested_optimizer": True,
           "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    ds, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=3e-2),
                                  config=cfg)
    # the production path: the trainer's builder, one in-process engine per rank (external_launcher)
    run = load_config(None, ["rollout.engine=vllm", "data.max_prompt_tokens=64", "rollout.max_response_tokens=256",
                             "rollout.max_turns=3", "rollout.max_new_tokens_per_turn=16", "rollout.max_obs_tokens=24"])
    vllm = build_engine(run, model_dir, rank=rank, world=world)
    tok = load_tokenizer(model_dir)
    # multi-turn rollouts with a different number of prompts (hence engine steps) on each rank
    qs = ["France?", "mountain?", "Berlin?"][: 1 + 2 * rank]
    items = [PromptItem(tok(f"Question: {q}\n", add_special_tokens=False)["input_ids"], uid=q) for q in qs]
    for mode in ("async", "sync"):
        run.rollout.mode = mode
        SearchAgent(vllm, KeywordRetriever(), tok, run.rollout, max_prompt_tokens=64).rollout(items, seed=rank)
    batch = tok(["Berlin is the capital of France. " * 4], return_tensors="pt")
    for _ in range(2):
        loss = ds(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss
        ds.backward(loss)
        ds.step()
    stats = sync_weights(vllm, ds.module.named_parameters(), bucket_mb=0.25)
    state = ds._zero3_consolidated_16bit_state_dict()  # collective; full dict on rank 0
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in ["Question: who is Paris", "Doc 1"]]
    greedy = SamplingConfig(temperature=0, max_new_tokens=16)
    got = [g.token_ids for g in vllm.generate(prompts, greedy)]
    obj = [got]
    gathered = [None] * world
    torch.distributed.all_gather_object(gathered, obj)
    if rank == 0:
        ref_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        ref_model.load_state_dict(state, strict=False)
        ref = [g.token_ids for g in HFEngine(ref_model, tok).generate(prompts, greedy)]
        ok = all(g[0] == ref for g in gathered)
        with open(os.path.join(out_dir, "result.txt"), "w") as f:
            f.write(f"{'OK' if ok else 'MISMATCH'} buckets={stats.num_buckets} seconds={stats.seconds:.4f}\n")
    torch.distributed.barrier()


if __name__ == "__main__":
    from _worker import run_worker
    run_worker(main, sys.argv[1], sys.argv[2])
