"""From a :class:`~tspo_fast.config.Config` to the objects a run uses: data, policy and
reference engines (DeepSpeed), the rollout engine, the retriever and the agent.

The trainer, ``tspo-fast eval`` and the benchmarks build their parts here, so one config gives
the same parts everywhere.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import deepspeed
import torch
from deepspeed.ops.adam import DeepSpeedCPUAdam

from ..config import Config
from ..data import QAExample, load_split
from ..engines.base import Engine, build_engine
from ..env.agent import SearchAgent
from ..models import load_causal_lm
from ..retrieval.base import Retriever, build_retriever
from .lora import apply_lora
from .policy import FusedHeadPolicy, frozen_trunk_depth
from .ppo import ds_config

__all__ = ["load_data", "build_actor", "build_reference", "build_agent", "build_rollout", "build_engine",
           "build_retriever"]


def load_data(cfg: Config) -> Tuple[List[QAExample], List[QAExample]]:
    """(training examples, test examples); the test set cut to ``data.eval_limit`` when set."""
    train = load_split(cfg.data.train_files)
    test = load_split(cfg.data.test_files) if cfg.data.test_files else []
    if cfg.data.eval_limit:
        test = test[: cfg.data.eval_limit]
    return train, test


def build_actor(cfg: Config, lm: torch.nn.Module, gas: int):
    """The trained policy as a DeepSpeed engine (AdamW, optional linear warm-up).  With
    ``model.lora.rank > 0`` the LM gets LoRA adapters and only they are trained."""
    if cfg.model.gradient_checkpointing:
        lm.gradient_checkpointing_enable()
        if cfg.model.lora.rank:
            lm.enable_input_require_grads()      # a frozen embedding would cut the checkpointed graph
    if cfg.model.lora.rank:
        lm = apply_lora(lm, cfg.model.lora)
    trunk = frozen_trunk_depth(lm) if cfg.model.lora.rank and cfg.model.lora.share_frozen else 0
    policy = FusedHeadPolicy(lm, chunk_size=cfg.loss.chunk_size, temperature=1.0, packing=cfg.train.packing,
                             frozen_trunk=trunk, share_prompts=cfg.train.share_prompts)
    trainable = [p for p in policy.parameters() if p.requires_grad]
    if cfg.train.offload_optimizer:   # DeepSpeed's CPU Adam steps the offloaded states (compiled once, ~100 s)
        optimizer = DeepSpeedCPUAdam(trainable, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, adamw_mode=True)
    else:
        optimizer = torch.optim.AdamW(trainable, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    sched = None
    if cfg.train.warmup_steps > 0:
        w = cfg.train.warmup_steps
        sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / w))
    actor, *_ = deepspeed.initialize(model=policy, optimizer=optimizer, lr_scheduler=sched,
                                     config=ds_config(cfg, gas))
    return actor


def build_reference(cfg: Config, model_path: str, gas: int):
    """The frozen reference policy (a DeepSpeed engine without optimizer), or None when ``loss.kl_coef``
    is 0 or the policy has LoRA adapters (then the reference is the actor with its adapters disabled)."""
    if cfg.loss.kl_coef <= 0 or cfg.model.lora.rank:
        return None
    ref_policy = FusedHeadPolicy(load_causal_lm(model_path, cfg.model.dtype), chunk_size=cfg.loss.chunk_size,
                                 packing=cfg.train.packing, share_prompts=cfg.train.share_prompts)
    for p in ref_policy.parameters():
        p.requires_grad_(False)
    ref, *_ = deepspeed.initialize(model=ref_policy, config=ds_config(cfg, gas, optimizer=False))
    return ref


def build_agent(cfg: Config, engine: Engine, retriever: Retriever, tokenizer) -> SearchAgent:
    """The rollout agent of ``cfg`` (rollout settings, ``retrieval.topk``, ``data.max_prompt_tokens``)."""
    return SearchAgent(engine, retriever, tokenizer, cfg.rollout, topk=cfg.retrieval.topk,
                       max_prompt_tokens=cfg.data.max_prompt_tokens)


def build_rollout(cfg: Config, model_path: str, tokenizer, *, rank: int = 0, world: int = 1,
                  retriever: Optional[Retriever] = None) -> SearchAgent:
    """Engine + retriever + agent for ``model_path`` (what evaluation needs, no optimizer)."""
    retriever = retriever if retriever is not None else build_retriever(cfg.retrieval)
    return build_agent(cfg, build_engine(cfg, model_path, rank=rank, world=world), retriever, tokenizer)
