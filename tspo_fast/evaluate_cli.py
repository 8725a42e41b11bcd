"""``tspo-fast eval --config CFG --checkpoint PATH``: greedy evaluation of a policy.

PATH is a Hugging Face model folder (e.g. written by ``train --export``) or a training
checkpoint folder (``<output_dir>/checkpoints/step_N`` or the ``checkpoints`` folder itself,
which means its latest).  Prints a table and writes ``--out`` (JSON).
"""
from __future__ import annotations

import argparse
import os
from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="tspo-fast eval", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--checkpoint", default=None, help="HF folder or training checkpoint (default: model.path)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--limit", type=int, default=None, help="evaluate only the first N test questions")
    ap.add_argument("--out", default=None, help="JSON result path (default: <output_dir>/eval.json)")
    args = ap.parse_args(argv)

    from .config import load_config
    from .evaluate import evaluate, format_table, write_result
    cfg = load_config(args.config, args.overrides)
    ck = args.checkpoint
    if ck is not None and not os.path.exists(ck):
        raise FileNotFoundError(f"--checkpoint: {ck} does not exist")
    if ck is None or os.path.exists(os.path.join(ck, "config.json")):
        # a model folder: only the rollout engine is needed
        from .models import load_tokenizer, resolve_model_path
        from .rollout.agent import SearchAgent
        from .sources import agent_config, build_engine, build_retriever, load_split
        path = resolve_model_path(ck or cfg.model.path)
        tok = load_tokenizer(path)
        agent = SearchAgent(build_engine(cfg, path), build_retriever(cfg.retrieval), tok,
                            agent_config(cfg, n=1, temperature=0.0))
        result = evaluate(agent, tok, load_split(cfg.data.test_files), chat_template=cfg.data.chat_template,
                          limit=args.limit or cfg.data.eval_limit or None, folr_source=cfg.reward.folr_source)
    else:
        from .checkpoint import latest_checkpoint, load_checkpoint
        from .trainer import Trainer
        folder = latest_checkpoint(ck) if os.path.exists(os.path.join(ck, "latest")) else ck
        cfg.loss.kl_coef = 0.0  # no reference model needed to evaluate
        trainer = Trainer(cfg, quiet=True)
        load_checkpoint(trainer.actor, folder)
        trainer.sync()
        result = trainer.evaluate(limit=args.limit)
    print(format_table(result))
    out = args.out or os.path.join(cfg.output_dir, "eval.json")
    write_result(result, out)
    print("wrote", out)
    return 0
