"""The PPO update under DeepSpeed: DeepSpeed configs, the exact global normaliser, forward-only
log-probs (pi_old, pi_ref) and the epochs over mini/micro-batches.

Loss normaliser (docs/algorithm.md §4, ``loss.agg: token_mean``): the number of loss-masked
tokens of the whole mini-batch over all ranks.  Each micro-batch's loss is its objective sum
divided by that count, multiplied by the gradient-accumulation steps and the world size, which
cancels DeepSpeed's own 1/GAS scaling and its averaging over ranks: the gradient is exactly that
of the global token mean, whatever the micro-batch split.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict

import torch

from ..config import Config, ConfigError
from .distributed import global_max, global_sum, world_size

__all__ = ["ds_config", "gradient_accumulation_steps", "UpdateStats", "token_weights_normalizer",
           "compute_logprobs", "ppo_update"]


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


def token_weights_normalizer(loss_mask: torch.Tensor, agg: str, world_rows: int, max_len: int):
    """``(weights, normalizer)`` of docs/algorithm.md §4 for one mini-batch (this rank's rows ``loss_mask``
    (b, L), reduced over ranks): ``weights`` (b, L) float32 per-token multipliers of K3's
    objective, or None for all ones; ``normalizer`` a float.

    token_mean: weights 1, normaliser = global loss-masked token count.
    seq_mean_token_mean: weight 1/(loss-masked tokens of the row); normaliser = global number
      of rows with at least one loss-masked token.
    seq_mean_token_sum (Dr. GRPO): weights 1, normaliser = global rows x global max response
      length (``max_len`` is this rank's; the maximum is taken over ranks here).
    """
    if agg == "token_mean":
        return None, global_sum(loss_mask.sum().item())
    if agg == "seq_mean_token_mean":
        lens = loss_mask.sum(1, keepdim=True, dtype=torch.float32)
        weights = torch.where(loss_mask.bool(), 1.0 / lens.clamp(min=1.0), torch.zeros(()))
        return weights, global_sum((lens > 0).sum().item())
    if agg == "seq_mean_token_sum":
        max_len = int(global_max(max_len))
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
