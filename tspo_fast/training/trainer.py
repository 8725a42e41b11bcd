"""The TSPO trainer: one step = rollout -> rewards -> advantages -> log-probs -> update -> sync.

The actor (and the frozen reference) are DeepSpeed engines (ZeRO-3 by default); the rollout
engine (vLLM or HF ``generate``) is colocated in the same process and receives the actor's
weights after every optimizer step, gathered bucket by bucket.  Scale-out is DeepSpeed's:
launch with ``deepspeed`` (hostfile, several nodes) or ``torchrun``; each rank rolls out its
share of the step's prompts with its own engine, and DeepSpeed averages gradients.  The update
itself (exact global normaliser, PPO epochs) is :mod:`tspo_fast.training.ppo`.
"""
from __future__ import annotations

import os
import signal
import time
import warnings
from typing import Any, Dict, List, Optional

import torch
from tqdm import tqdm

from ..algo.advantages import batch_advantages
from ..algo.rewards import score_batch
from ..config import Config, ConfigError, dump_config
from ..data import QAExample, prompt_items
from ..engines.base import mix_seed
from ..engines.sync import release_for_update, sync_weights
from ..models import load_policy, resolve_model_path
from .builders import build_actor, build_agent, build_engine, build_reference, build_retriever, load_data
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .distributed import init_distributed, rank, seed_everything, shutdown, world_size
from .evaluate import evaluate
from .metrics import MetricsLogger, step_metrics
from .plan import plan_memory
from .ppo import compute_logprobs, gradient_accumulation_steps, plan_update, ppo_update

__all__ = ["Trainer", "preflight"]

# DeepSpeed 0.19 calls torch.distributed collectives that torch 2.13 marks deprecated, once per
# gather: keep the training log readable.
warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use `torch\.distributed", category=FutureWarning)


def preflight(cfg: Config, world: int) -> None:
    """On CUDA, before anything is allocated: the memory plan (``tspo-fast plan``) must fit the card."""
    if not (torch.cuda.is_available() and cfg.train.memory_check):
        return
    card = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 2 ** 30
    plan = plan_memory(cfg, world, card, model_path=resolve_model_path(cfg.model.path))
    if not plan.fits:
        raise ConfigError("the run does not fit the GPU memory (set train.memory_check: false to try anyway):\n"
                          + plan.table())


class Trainer:
    """Builds every part from a :class:`Config` and runs :meth:`fit`."""

    def __init__(self, cfg: Config, *, resume: bool = False, quiet: bool = False):
        self.cfg = cfg
        self.quiet = quiet
        init_distributed()
        self.rank, self.world = rank(), world_size()
        seed_everything(cfg.seed + self.rank)
        self.gas = gradient_accumulation_steps(cfg, self.world)
        os.makedirs(cfg.output_dir, exist_ok=True)
        if self.rank == 0:
            dump_config(cfg, os.path.join(cfg.output_dir, "config.yaml"))

        preflight(cfg, self.world)
        self.model_path, self.tokenizer, self.lm = load_policy(cfg.model.path, cfg.model.dtype)
        self.actor = build_actor(cfg, self.lm, self.gas)
        self.ref = build_reference(cfg, self.model_path, self.gas)
        self.train_examples, self.test_examples = load_data(cfg)
        self.retriever = build_retriever(cfg.retrieval)
        self.engine = build_engine(cfg, self.model_path, rank=self.rank, world=self.world)
        self.agent = build_agent(cfg, self.engine, self.retriever, self.tokenizer)
        self.ckpt_root = os.path.join(cfg.output_dir, "checkpoints")
        self.step = 0
        if resume:
            folder = latest_checkpoint(self.ckpt_root)
            if folder is None:
                raise FileNotFoundError(f"--resume: no checkpoint under {self.ckpt_root}")
            self.step = int(load_checkpoint(self.actor, folder)["step"])
            self.sync()
        self.logger = MetricsLogger(cfg.output_dir, enabled=self.rank == 0, resume_step=self.step if resume else None)
        self._stop = False
        signal.signal(signal.SIGTERM, self._on_sigterm)

    # -- helpers
    def _on_sigterm(self, signum, frame) -> None:
        self._stop = True

    def prompts_for_step(self, step: int) -> List[QAExample]:
        """This rank's prompts of ``step``: a seeded permutation per epoch, consumed in order."""
        P = self.cfg.train.prompts_per_step
        n = len(self.train_examples)
        out = []
        for j in range(step * P, (step + 1) * P):
            epoch, i = divmod(j, n)
            g = torch.Generator().manual_seed(self.cfg.seed * 7919 + epoch)
            order = torch.randperm(n, generator=g) if self.cfg.data.shuffle else torch.arange(n)
            out.append(self.train_examples[int(order[i])])
        per = P // self.world
        return out[self.rank * per:(self.rank + 1) * per]

    def rollout_seed(self, step: int) -> int:
        """The sampling seed of ``step`` on this rank (a hash of seed, step and rank: no collisions)."""
        return mix_seed(self.cfg.seed, step, self.rank)

    def sync(self) -> float:
        st = sync_weights(self.engine, self.actor.module.lm.named_parameters(), bucket_mb=self.cfg.rollout.sync_bucket_mb)
        return st.seconds

    # -- one step
    def train_step(self) -> Dict[str, float]:
        cfg = self.cfg
        times: Dict[str, float] = {}
        t0 = time.perf_counter()
        items = prompt_items(self.prompts_for_step(self.step), self.tokenizer, cfg.data.chat_template)
        batch = self.agent.rollout(items, seed=self.rollout_seed(self.step))
        release_for_update(self.engine)            # the engine sleeps (CUDA) while the update runs
        times["time/rollout"] = time.perf_counter() - t0
        times["time/rollout_generate"] = batch.stats.get("gen_seconds", 0.0)
        times["time/rollout_retrieval_wait"] = batch.stats.get("retrieval_wait_seconds", 0.0)

        t1 = time.perf_counter()
        outcome, first_turn = score_batch(batch, self.tokenizer, outcome=cfg.reward.outcome,
                                          source=cfg.reward.folr_source)
        token_adv, turn_adv = batch_advantages(batch, outcome, first_turn, mode=cfg.advantage.mode,
                                               norm=cfg.advantage.norm, alpha=cfg.reward.folr_alpha,
                                               gamma=cfg.advantage.gamma, eps=cfg.advantage.eps,
                                               max_turns=cfg.rollout.max_turns + 1)
        times["time/reward_advantage"] = time.perf_counter() - t1

        t2 = time.perf_counter()
        plan = plan_update(batch, token_adv, cfg, self.actor.device)   # micro-batches on the device, once
        if not plan.on_policy:                                          # pi_old = pi when exactly on-policy
            compute_logprobs(self.actor, plan, "old_logp")
        if self.ref is not None:                                        # kl_coef > 0
            compute_logprobs(self.ref, plan, "ref_logp")
        times["time/logprobs"] = time.perf_counter() - t2

        t3 = time.perf_counter()
        upd = ppo_update(self.actor, plan, cfg)
        times["time/update"] = time.perf_counter() - t3

        t4 = time.perf_counter()
        self.sync()
        times["time/sync"] = time.perf_counter() - t4
        self.step += 1
        times["time/step"] = time.perf_counter() - t0
        return step_metrics(batch, outcome, first_turn, token_adv, turn_adv, upd, times,
                            outcome_kind=cfg.reward.outcome, plan=plan)

    def save(self) -> str:
        return save_checkpoint(self.actor, self.ckpt_root, self.step,
                               {"step": self.step, "data_position": self.step * self.cfg.train.prompts_per_step,
                                "seed": self.cfg.seed}, keep=self.cfg.train.keep_checkpoints)

    def evaluate(self, examples=None, *, limit: Optional[int] = None) -> Dict[str, Any]:
        return evaluate(self.agent, self.tokenizer, examples if examples is not None else self.test_examples,
                        chat_template=self.cfg.data.chat_template, limit=limit, folr_source=self.cfg.reward.folr_source)

    def fit(self, max_steps: Optional[int] = None) -> Dict[str, float]:
        """Train until ``train.total_steps`` (or ``max_steps`` more steps, or SIGTERM)."""
        cfg = self.cfg
        end = cfg.train.total_steps if max_steps is None else min(cfg.train.total_steps, self.step + max_steps)
        last: Dict[str, float] = {}
        if self.step == 0 and cfg.train.eval_at_start and cfg.train.eval_every and self.test_examples and end > 0:
            ev = self.evaluate()
            self.logger.log(0, {f"eval/{k}": v for k, v in ev["overall"].items()})
        bar = tqdm(total=end, initial=self.step, desc="train", disable=self.quiet or self.rank != 0, dynamic_ncols=True)
        while self.step < end and not self._stop:
            last = self.train_step()
            if cfg.train.eval_every and self.step % cfg.train.eval_every == 0 and self.test_examples:
                ev = self.evaluate()
                last.update({f"eval/{k}": v for k, v in ev["overall"].items()})
            self.logger.log(self.step, last)
            bar.update(1)
            bar.set_postfix(reward=f"{last['reward/mean']:.3f}", folr=f"{last['reward/folr_hit']:.2f}",
                            turns=f"{last['rollout/turns']:.2f}")
            if cfg.train.checkpoint_every and self.step % cfg.train.checkpoint_every == 0:
                self.save()
        bar.close()
        if self._stop:  # SIGTERM: leave a checkpoint to resume from
            self.save()
        return last

    def close(self) -> None:
        """Close the metrics log and the process group."""
        self.logger.close()
        shutdown()
