"""Sharded evaluation check, run by ``torchrun --nproc_per_node 2`` from test_evaluate.py (and
as a plain process there for world size 1).

The shipped warm-start policy behind the HF engine with one prompt per ``generate`` call (so a
question's greedy tokens do not depend on which questions share its batch), in-process BM25 over
the bundled world, ``evaluate`` on the first questions of the bundled test set.  A recorder around
the real agent counts the questions this rank rolled out.  argv: output folder, question count;
rank r writes ``eval_r.json`` (its result and its count).
"""
import json
import os
import sys

import torch


class CountingAgent:
    """The real agent; counts the questions each ``rollout`` call receives."""

    def __init__(self, agent):
        self.agent, self.questions = agent, 0

    def rollout(self, items, **kw):
        self.questions += len(items)
        return self.agent.rollout(items, **kw)


def evaluate_questions(n: int):
    """(result, questions rolled out here) of ``evaluate`` on the first ``n`` bundled test questions."""
    from tspo_fast.config import load_config
    from tspo_fast.engines.hf import HFEngine
    from tspo_fast.models import load_policy
    from tspo_fast.training.builders import build_agent, build_retriever, load_data
    from tspo_fast.training.evaluate import evaluate

    cfg = load_config("configs/tiny.yaml", ["rollout.engine=hf"])
    path, tok, lm = load_policy(cfg.model.path, cfg.model.dtype)
    engine = HFEngine(lm, tok, batch_size=1, max_model_len=cfg.data.max_prompt_tokens + cfg.rollout.max_response_tokens)
    agent = CountingAgent(build_agent(cfg, engine, build_retriever(cfg.retrieval), tok))
    _, test = load_data(cfg)
    result = evaluate(agent, tok, test[:n], chat_template=cfg.data.chat_template, batch_prompts=4,
                      folr_source=cfg.reward.folr_source)
    return result, agent.questions


def main(out_dir: str, n: str) -> None:
    if "RANK" in os.environ:
        torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    result, questions = evaluate_questions(int(n))
    with open(os.path.join(out_dir, f"eval_{rank}.json"), "w") as f:
        json.dump({"result": result, "questions": questions,
                   "world": torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1}, f)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _worker import run_worker
    run_worker(main, sys.argv[1], sys.argv[2])
