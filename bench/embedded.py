"""The embedded default's rollout engine, as the rollout benchmarks use it.

``embedded_vllm(slots)``: ``configs/tiny.yaml`` with the vLLM engine (the shipped warm-start
policy), optionally ``rollout.max_num_seqs=slots``; returns (config, tokenizer, engine, training
examples).  The caller closes the engine.
"""
from __future__ import annotations

import os
from typing import Optional

from tspo_fast.config import load_config
from tspo_fast.models import load_tokenizer, resolve_model_path
from tspo_fast.training.builders import build_engine, load_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def embedded_vllm(slots: Optional[int] = None):
    extra = [] if slots is None else [f"rollout.max_num_seqs={slots}"]
    cfg = load_config(os.path.join(ROOT, "configs", "tiny.yaml"), ["rollout.engine=vllm"] + extra)
    path = resolve_model_path(cfg.model.path)
    tok = load_tokenizer(path)
    engine = build_engine(cfg, path)
    train, _ = load_data(cfg)
    return cfg, tok, engine, train
