"""The TSPO trainer: one step = rollout -> rewards -> advantages -> log-probs -> update -> sync.

The actor (and the frozen reference) are DeepSpeed engines (ZeRO-3 by default); the rollout
engine (vLLM or HF ``generate``) is colocated in the same process and receives the actor's
weights after every optimizer step, gathered bucket by bucket.  Scale-out is DeepSpeed's:
launch with ``deepspeed`` (hostfile, several nodes) or ``torchrun``; each rank rolls out its
share of the step's prompts with its own engine, and DeepSpeed averages gradients.

Loss normaliser (SPEC §4, ``loss.agg: token_mean``): the number of loss-masked tokens of the
whole mini-batch over all ranks.  Each micro-batch's loss is its objective sum divided by that
count, multiplied by the gradient-accumulation steps and the world size, which cancels
DeepSpeed's own 1/GAS scaling and its averaging over ranks: the gradient is exactly that of
the global token mean, whatever the micro-batch split.
"""
from __future__ import annotations

import math
import os
import random
import signal
import time
import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist

from .advantage import batch_advantages
from .config import Config, ConfigError, dump_config
from .metrics import MetricsLogger
from .policy import FusedHeadPolicy
from .reward import score_batch


# DeepSpeed 0.19 calls torch.distributed collectives that torch 2.13 marks deprecated, once per
# gather: keep the training log readable.
warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use `torch\.distributed", category=FutureWarning)


# ----------------------------------------------------------------------------- distributed
def init_distributed() -> None:
    """Initialise torch.distributed the DeepSpeed way (env from deepspeed/torchrun, or a
    single local process)."""
    import deepspeed
    if dist.is_initialized():
        return
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        import socket
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend)


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def ds_config(cfg: Config, gas: int, *, optimizer: bool = True) -> Dict[str, Any]:
    """DeepSpeed config of the actor (``optimizer=True``) or of the frozen reference."""
    t = cfg.train
    c: Dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": gas,
        "zero_optimization": {"stage": t.zero_stage, "stage3_param_persistence_threshold": 0},
        "bf16": {"enabled": t.bf16},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }
    if optimizer:
        c["gradient_clipping"] = t.grad_clip
    return c


def gradient_accumulation_steps(cfg: Config, world: int) -> int:
    t, n = cfg.train, cfg.rollout.n
    if t.prompts_per_step % world:
        raise ConfigError(f"train.prompts_per_step: {t.prompts_per_step} is not divisible by the world size {world}")
    rows = t.mini_batch_prompts * n
    if rows % (world * t.micro_batch_size):
        raise ConfigError(f"train.micro_batch_size: mini-batch of {t.mini_batch_prompts} prompts x n={n} = {rows} "
                          f"rows does not split into {world} rank(s) x micro-batches of {t.micro_batch_size}")
    return rows // (world * t.micro_batch_size)


# ----------------------------------------------------------------------------- the update
@dataclass
class UpdateStats:
    loss: float = 0.0
    kl: float = 0.0
    entropy: float = 0.0
    clip_frac: float = 0.0
    grad_norm: float = 0.0
    tokens: int = 0


def _reduce_device() -> torch.device:
    """NCCL reduces CUDA tensors only; gloo takes CPU tensors."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _global_reduce(x: float, op=None) -> float:
    """``x`` reduced over all ranks (sum by default)."""
    if not dist.is_initialized() or world_size() == 1:
        return float(x)
    t = torch.tensor([float(x)], dtype=torch.float64, device=_reduce_device())
    dist.all_reduce(t, op=op if op is not None else dist.ReduceOp.SUM)
    return float(t.item())


def _global_sum(x: float) -> float:
    return _global_reduce(x)


def token_weights_normalizer(loss_mask: torch.Tensor, agg: str, world_rows: int, max_len: int):
    """``(weights, normalizer)`` of SPEC §4 for one mini-batch (this rank's rows ``loss_mask``
    (b, L), reduced over ranks): ``weights`` (b, L) float32 per-token multipliers of K3's
    objective, or None for all ones; ``normalizer`` a float.

    token_mean: weights 1, normaliser = global loss-masked token count.
    seq_mean_token_mean: weight 1/(loss-masked tokens of the row); normaliser = global number
      of rows with at least one loss-masked token.
    seq_mean_token_sum (Dr. GRPO): weights 1, normaliser = global rows x global max response
      length (``max_len`` is this rank's; the maximum is taken over ranks here).
    """
    if agg == "token_mean":
        return None, _global_sum(loss_mask.sum().item())
    if agg == "seq_mean_token_mean":
        lens = loss_mask.sum(1, keepdim=True, dtype=torch.float32)
        weights = torch.where(loss_mask.bool(), 1.0 / lens.clamp(min=1.0), torch.zeros(()))
        return weights, _global_sum((lens > 0).sum().item())
    if agg == "seq_mean_token_sum":
        max_len = int(_global_reduce(max_len, dist.ReduceOp.MAX))
        return None, float(world_rows * max_len)
    raise ConfigError(f"loss.agg: unknown aggregation {agg!r}")


def compute_logprobs(engine, batch, micro: int):
    """Per-token log-probs (B, L) of ``batch`` under ``engine``'s model (no grad)."""
    out = torch.zeros(batch.input_ids.shape, dtype=torch.float32)
    ent = torch.zeros_like(out)
    was_training = engine.module.training
    engine.module.eval()
    with torch.no_grad():
        for s in range(0, len(batch), micro):
            sl = slice(s, s + micro)
            lp, en = engine(batch.input_ids[sl].to(engine.device), batch.attention_mask[sl].to(engine.device),
                            batch.loss_mask[sl].to(engine.device), mode="logprobs")
            out[sl], ent[sl] = lp.cpu(), en.cpu()
    engine.module.train(was_training)
    return out, ent


def ppo_update(engine, batch, token_adv, old_logp, ref_logp, cfg: Config, gas: int) -> UpdateStats:
    """PPO epochs over mini-batches of this rank's rows; one optimizer step per mini-batch."""
    t, lo = cfg.train, cfg.loss
    world = world_size()
    rows_per_mini = gas * t.micro_batch_size
    stats = UpdateStats()
    max_len = int((batch.turn_id >= 0).sum(1).max().item()) if len(batch) else 1
    n_steps = 0
    for _ in range(t.ppo_epochs):
        for m0 in range(0, len(batch), rows_per_mini):
            mini = slice(m0, m0 + rows_per_mini)
            weights, norm = token_weights_normalizer(batch.loss_mask[mini], lo.agg, rows_per_mini * world, max_len)
            norm = max(norm, 1.0)
            for s in range(m0, m0 + rows_per_mini, t.micro_batch_size):
                sl = slice(s, s + t.micro_batch_size)
                dev = engine.device
                out = engine(batch.input_ids[sl].to(dev), batch.attention_mask[sl].to(dev), batch.loss_mask[sl].to(dev),
                             mode="loss", old_logp=old_logp[sl].to(dev), advantages=token_adv[sl].to(dev),
                             ref_logp=None if ref_logp is None else ref_logp[sl].to(dev),
                             weights=None if weights is None else weights[s - m0:s - m0 + t.micro_batch_size].to(dev),
                             rollout_logp=batch.rollout_logp[sl].to(dev) if lo.tis_cap else None,
                             normalizer=norm, eps_low=lo.eps_low, eps_high=lo.eps_high, dual_clip=lo.dual_clip,
                             beta=lo.kl_coef if ref_logp is not None else 0.0, kl_clamp=lo.kl_clamp,
                             entropy_coef=lo.entropy_coef, tis_cap=lo.tis_cap)
                # cancel DeepSpeed's 1/GAS and its mean over ranks: the gradient is the global sum / norm
                engine.backward(out.loss * gas * world)
                engine.step()
                n = int(out.logp.numel())
                stats.loss += float(out.loss.detach()) * 1.0
                stats.kl += float(out.kl.sum()) if n else 0.0
                stats.entropy += float(out.entropy.sum()) if n else 0.0
                stats.clip_frac += float(out.clip_frac) * n
                stats.tokens += n
            gn = engine.get_global_grad_norm()
            stats.grad_norm += float(gn) if gn is not None else 0.0
            n_steps += 1
    tok = max(stats.tokens, 1)
    stats.kl /= tok
    stats.entropy /= tok
    stats.clip_frac /= tok
    stats.grad_norm /= max(n_steps, 1)
    stats.loss /= max(t.ppo_epochs, 1)
    return stats


# ----------------------------------------------------------------------------- the trainer
class Trainer:
    """Builds every part from a :class:`Config` and runs :meth:`fit`."""

    def __init__(self, cfg: Config, *, resume: bool = False, quiet: bool = False):
        import deepspeed

        from .sources import agent_config, build_engine, build_retriever, load_split, prompt_items
        from .models import load_policy
        from .rollout.agent import SearchAgent

        self.cfg = cfg
        self.quiet = quiet
        init_distributed()
        self.rank, self.world = rank(), world_size()
        seed_everything(cfg.seed + self.rank)
        self.gas = gradient_accumulation_steps(cfg, self.world)
        os.makedirs(cfg.output_dir, exist_ok=True)
        if self.rank == 0:
            dump_config(cfg, os.path.join(cfg.output_dir, "config.yaml"))

        self.model_path, self.tokenizer, lm = load_policy(cfg.model.path, cfg.model.dtype)
        if cfg.model.gradient_checkpointing:
            lm.gradient_checkpointing_enable()
        self.lm = lm
        policy = FusedHeadPolicy(lm, chunk_size=cfg.loss.chunk_size, temperature=1.0)
        optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
        sched = None
        if cfg.train.warmup_steps > 0:
            w = cfg.train.warmup_steps
            sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / w))
        self.actor, *_ = deepspeed.initialize(model=policy, optimizer=optimizer, lr_scheduler=sched,
                                              config=ds_config(cfg, self.gas))
        self.ref = None
        if cfg.loss.kl_coef > 0:
            from .models import load_causal_lm
            ref_policy = FusedHeadPolicy(load_causal_lm(self.model_path, cfg.model.dtype),
                                         chunk_size=cfg.loss.chunk_size)
            for p in ref_policy.parameters():
                p.requires_grad_(False)
            self.ref, *_ = deepspeed.initialize(model=ref_policy, config=ds_config(cfg, self.gas, optimizer=False))

        self.train_examples = load_split(cfg.data.train_files)
        self.test_examples = load_split(cfg.data.test_files) if cfg.data.test_files else []
        if cfg.data.eval_limit:
            self.test_examples = self.test_examples[: cfg.data.eval_limit]
        self.retriever = build_retriever(cfg.retrieval)
        self.engine = build_engine(cfg, self.model_path, rank=self.rank, world=self.world)
        self.agent_cfg = agent_config(cfg)
        self.agent = SearchAgent(self.engine, self.retriever, self.tokenizer, self.agent_cfg)
        self._prompt_items = prompt_items
        self.ckpt_root = os.path.join(cfg.output_dir, "checkpoints")
        self.step = 0
        start_metrics = None
        if resume:
            from .checkpoint import latest_checkpoint, load_checkpoint
            folder = latest_checkpoint(self.ckpt_root)
            if folder is None:
                raise FileNotFoundError(f"--resume: no checkpoint under {self.ckpt_root}")
            state = load_checkpoint(self.actor, folder)
            self.step = int(state["step"])
            start_metrics = self.step
            self.sync()
        self.logger = MetricsLogger(cfg.output_dir, enabled=self.rank == 0, resume_step=start_metrics)
        self._stop = False
        signal.signal(signal.SIGTERM, self._on_sigterm)

    # -- helpers
    def _on_sigterm(self, signum, frame) -> None:
        self._stop = True

    def prompts_for_step(self, step: int) -> List[Any]:
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

    def sync(self) -> float:
        from .rollout.sync import sync_weights
        st = sync_weights(self.engine, self.actor.module.lm.named_parameters(), bucket_mb=self.cfg.rollout.sync_bucket_mb)
        return st.seconds

    # -- one step
    def train_step(self) -> Dict[str, float]:
        cfg = self.cfg
        times: Dict[str, float] = {}
        t0 = time.perf_counter()
        self.agent.config.seed = cfg.seed * 1_000_003 + self.step * self.world + self.rank
        items = self._prompt_items(self.prompts_for_step(self.step), self.tokenizer, cfg.data.chat_template)
        batch = self.agent.rollout(items)
        times["time/rollout"] = time.perf_counter() - t0

        t1 = time.perf_counter()
        outcome, first_turn = score_batch(batch, self.tokenizer, outcome=cfg.reward.outcome,
                                          source=cfg.reward.folr_source)
        token_adv, turn_adv = batch_advantages(batch, outcome, first_turn, mode=cfg.advantage.mode,
                                               norm=cfg.advantage.norm, alpha=cfg.reward.folr_alpha,
                                               gamma=cfg.advantage.gamma, eps=cfg.advantage.eps,
                                               max_turns=cfg.rollout.max_turns + 1)
        times["time/reward_advantage"] = time.perf_counter() - t1

        t2 = time.perf_counter()
        old_logp, _ = compute_logprobs(self.actor, batch, cfg.train.micro_batch_size)
        ref_logp = compute_logprobs(self.ref, batch, cfg.train.micro_batch_size)[0] if self.ref is not None else None
        times["time/logprobs"] = time.perf_counter() - t2

        t3 = time.perf_counter()
        upd = ppo_update(self.actor, batch, token_adv, old_logp, ref_logp, cfg, self.gas)
        times["time/update"] = time.perf_counter() - t3

        t4 = time.perf_counter()
        self.sync()
        times["time/sync"] = time.perf_counter() - t4
        self.step += 1

        gen_tokens = float(batch.loss_mask.sum())
        elapsed = time.perf_counter() - t0
        adv_on_tokens = token_adv[batch.loss_mask]
        valid_turns = turn_adv[torch.arange(turn_adv.shape[1])[None] < batch.num_turns[:, None].long()]
        m = {
            "reward/mean": float(outcome.mean()),
            "reward/folr_hit": float((first_turn >= 0).float().mean()),
            "reward/all_fail_groups": _all_fail_fraction(outcome, batch.group_id),
            "rollout/turns": float(batch.num_turns.float().mean()),
            "rollout/searches": float(batch.num_searches.float().mean()),
            "rollout/truncated": float(batch.truncated.float().mean()),
            "rollout/response_tokens": float(batch.response_lengths().float().mean()),
            "advantage/std": float(valid_turns.std()) if valid_turns.numel() > 1 else 0.0,
            "advantage/token_abs_mean": float(adv_on_tokens.abs().mean()) if adv_on_tokens.numel() else 0.0,
            "loss/pg": upd.loss, "loss/kl": upd.kl, "loss/entropy": upd.entropy, "loss/clip_frac": upd.clip_frac,
            "train/grad_norm": upd.grad_norm, "train/tokens_per_s": gen_tokens / max(elapsed, 1e-9),
            "time/step": elapsed, **times,
        }
        if cfg.reward.outcome == "em":
            m["reward/em"] = m["reward/mean"]
        return m

    def save(self) -> str:
        from .checkpoint import save_checkpoint
        return save_checkpoint(self.actor, self.ckpt_root, self.step,
                               {"step": self.step, "data_position": self.step * self.cfg.train.prompts_per_step,
                                "seed": self.cfg.seed}, keep=self.cfg.train.keep_checkpoints)

    def evaluate(self, examples=None, *, limit: Optional[int] = None) -> Dict[str, Any]:
        from .evaluate import evaluate
        return evaluate(self.agent, self.tokenizer, examples if examples is not None else self.test_examples,
                        chat_template=self.cfg.data.chat_template, limit=limit, folr_source=self.cfg.reward.folr_source)

    def fit(self, max_steps: Optional[int] = None) -> Dict[str, float]:
        """Train until ``train.total_steps`` (or ``max_steps`` more steps, or SIGTERM)."""
        from tqdm import tqdm
        cfg = self.cfg
        end = cfg.train.total_steps if max_steps is None else min(cfg.train.total_steps, self.step + max_steps)
        last: Dict[str, float] = {}
        if (self.step == 0 and cfg.train.eval_at_start and cfg.train.eval_every and self.test_examples
                and end > 0):
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
        self.logger.close()


def _all_fail_fraction(outcome: torch.Tensor, group_id: torch.Tensor) -> float:
    """Share of groups whose every rollout scored 0: where GRPO has no signal and FOLR may."""
    groups = torch.unique(group_id)
    if groups.numel() == 0:
        return 0.0
    fails = sum(bool((outcome[group_id == g] <= 0).all()) for g in groups)
    return fails / groups.numel()
