"""The PPO update under DeepSpeed: DeepSpeed configs, the exact global normaliser, forward-only
log-probs (pi_old, pi_ref) and the epochs over mini/micro-batches (packed by a token budget or
padded, :mod:`tspo_fast.training.packing`).

Loss normaliser (docs/algorithm.md §4, ``loss.agg: token_mean``): the number of loss-masked
tokens of the whole mini-batch over all ranks.  Each micro-batch's loss is its objective sum
divided by that count and multiplied by the world size, which cancels DeepSpeed's averaging over
ranks; DeepSpeed's accumulation is unmanaged (no 1/GAS scaling, one ``step()`` per mini-batch).
So the gradient is exactly that of the global token mean, whatever the micro-batch split, the
packing or the number of ranks.

Passes: pi_old is recomputed only when the update is not exactly on-policy (more than one
mini-batch or epoch); otherwise K3 takes ``old_logp=None`` (pi_old = pi, detached).  pi_ref runs
only when ``loss.kl_coef`` > 0.  Where the policy has a frozen trunk (LoRA on the top layers,
``model.lora.share_frozen``), the first pass over a micro-batch computes the trunk's output once
and every later pass of the step starts from it (:func:`policy_inputs`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import deepspeed
import torch
from packaging.version import Version

from ..config import Config, ConfigError, LossConfig
from .distributed import global_max, global_sum, world_size
from .packing import MicroBatch, micro_batches

__all__ = ["MIN_DEEPSPEED", "check_deepspeed_version", "ds_config", "gradient_accumulation_steps", "UpdatePlan",
           "UpdateStats", "token_weights_normalizer", "plan_update", "policy_inputs", "compute_logprobs",
           "loss_kwargs", "ppo_update", "rollout_mismatch", "TRAINER_LOSS_FIELDS"]


#: The oldest DeepSpeed the update is exact with.  ``managed_gradient_accumulation: false`` (the
#: update owns the accumulation boundary; see :func:`ds_config`) first exists in DeepSpeed 0.19.4;
#: an older DeepSpeed ignores the key without a word, scales every micro-batch's gradient by
#: 1/GAS and steps on its own boundary, so the gradient is no longer the global token mean's.
#: setup.py's floor is the same version.
MIN_DEEPSPEED = "0.19.4"


def check_deepspeed_version(version: Optional[str] = None) -> None:
    """Refuse a DeepSpeed older than :data:`MIN_DEEPSPEED` (``version``: the installed one by default)."""
    version = deepspeed.__version__ if version is None else version
    if Version(version) < Version(MIN_DEEPSPEED):
        raise RuntimeError(
            f"DeepSpeed {version} is installed; tspo-fast needs deepspeed>={MIN_DEEPSPEED}: the update relies on "
            f"'managed_gradient_accumulation', which first exists in {MIN_DEEPSPEED} (older versions ignore it "
            f"silently and would scale and step the gradients on their own); pip install 'deepspeed>={MIN_DEEPSPEED}'")


def ds_config(cfg: Config, gas: int, *, optimizer: bool = True) -> Dict[str, Any]:
    """DeepSpeed config of the actor (``optimizer=True``) or of the frozen reference (checks the
    installed DeepSpeed against :data:`MIN_DEEPSPEED` first)."""
    check_deepspeed_version()
    t = cfg.train
    # stages 1 and 2 partition optimizer states and gradients, which a frozen engine (no optimizer)
    # does not have: DeepSpeed refuses them there ("zero stage 2 requires an optimizer"); stage 0 is the same
    stage = t.zero_stage if optimizer or t.zero_stage == 3 else 0
    c: Dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": gas,
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
        "bf16": {"enabled": t.bf16},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
        # the update owns the accumulation boundary: any number of micro-batches per optimizer
        # step (packing), no 1/GAS scaling in backward, one step() per mini-batch
        "managed_gradient_accumulation": False,
    }
    if t.offload_optimizer and optimizer:
        c["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if t.offload_param:
        c["zero_optimization"]["offload_param"] = {"device": "cpu", "pin_memory": True}
    if optimizer:
        c["gradient_clipping"] = t.grad_clip
    return c


def gradient_accumulation_steps(cfg: Config, world: int) -> int:
    """Micro-batches per mini-batch in the padded layout (checks that the batch splits evenly over
    ranks; with packing the count follows the token budget and this is only DeepSpeed's nominal value)."""
    t, n = cfg.train, cfg.rollout.n
    if t.prompts_per_step % world:
        raise ConfigError(f"train.prompts_per_step: {t.prompts_per_step} is not divisible by the world size {world}")
    rows = t.mini_batch_prompts * n
    if rows % world:
        raise ConfigError(f"train.mini_batch_prompts: {t.mini_batch_prompts} prompts x n={n} = {rows} rows do not "
                          f"split over {world} rank(s)")
    if t.packing:
        return 1
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
    mismatch: Dict[str, float] = field(default_factory=dict)
    #: the first micro-batch's loss-token log-probs under the weights before the update (the
    #: reference of the guard's post-update check, :func:`tspo_fast.training.guard.update_kl`)
    before_logp: Optional[torch.Tensor] = None


@dataclass
class UpdatePlan:
    """The micro-batches of one step's update, per mini-batch, on the device, with each
    mini-batch's global normaliser.  ``on_policy``: one mini-batch and one epoch, and
    ``train.recompute_old_logp`` off: no pi_old pass, K3 takes pi_old = pi."""

    minis: List[List[MicroBatch]]
    normalizers: List[float]
    on_policy: bool

    def micro(self) -> List[MicroBatch]:
        return [mb for mini in self.minis for mb in mini]

    @property
    def slots(self) -> int:
        return sum(mb.slots for mb in self.micro())

    @property
    def tokens(self) -> int:
        return sum(mb.tokens for mb in self.micro())


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


def plan_update(batch, token_adv: torch.Tensor, cfg: Config, device) -> UpdatePlan:
    """Split this rank's rows into mini-batches and those into micro-batches on ``device``
    (collective: every rank calls it; the normalisers and packed bin counts are reduced)."""
    t, lo = cfg.train, cfg.loss
    world = world_size()
    rows_per_mini = t.mini_batch_prompts * cfg.rollout.n // world
    max_len = int((batch.turn_id >= 0).sum(1).max().item()) if len(batch) else 1
    minis, norms = [], []
    for m0 in range(0, len(batch), rows_per_mini):
        rows = list(range(m0, min(len(batch), m0 + rows_per_mini)))
        weights, norm = token_weights_normalizer(batch.loss_mask[rows], lo.agg, rows_per_mini * world, max_len)
        minis.append(micro_batches(batch, rows, token_adv, weights, packing=t.packing, budget=t.max_tokens_per_micro,
                                   micro_size=t.micro_batch_size, device=device, share_prompts=t.share_prompts))
        norms.append(max(norm, 1.0))
    on_policy = t.ppo_epochs == 1 and len(minis) == 1 and not t.recompute_old_logp
    return UpdatePlan(minis, norms, on_policy)


def policy_inputs(engine, mb: MicroBatch) -> Dict[str, Any]:
    """``mb``'s keyword arguments for ``engine``'s policy.  When that policy has a frozen trunk
    (``FusedHeadPolicy.frozen_trunk`` > 0) they include its output on ``mb``, computed on the first
    call (no grad, eval mode) and kept on ``mb`` for the step's later passes.  Only the actor's
    policy has a trunk (a separate reference model trains nothing and is built without one)."""
    inputs = mb.model_inputs()
    if getattr(engine.module, "frozen_trunk", 0):
        if mb.trunk is None:
            was_training = engine.module.training
            engine.module.eval()
            with torch.no_grad():
                mb.trunk = engine(**inputs, mode="trunk")
            engine.module.train(was_training)
        inputs["trunk"] = mb.trunk
    return inputs


def compute_logprobs(engine, plan: UpdatePlan, field_name: str) -> None:
    """Fill ``mb.<field_name>`` ("old_logp" or "ref_logp") of every micro-batch with the per-token
    log-probs of ``engine``'s model (no grad; 0 off the loss mask)."""
    was_training = engine.module.training
    engine.module.eval()
    with torch.no_grad():
        for mb in plan.micro():
            lp, _ = engine(**policy_inputs(engine, mb), mode="logprobs")
            setattr(mb, field_name, lp)
    engine.module.train(was_training)


def rollout_mismatch(pairs: List[tuple]) -> Dict[str, float]:
    """Train/inference mismatch on the sampled tokens: ``pairs`` of (trainer logp, rollout logp)
    tensors.  ``mean_abs`` / ``max_abs`` of their difference and the k3 estimate of
    KL(pi_rollout || pi_trainer) (d = logp_trainer - logp_rollout: mean of exp(d) - d - 1)."""
    if not pairs:
        return {}
    a = torch.cat([p.double().reshape(-1) for p, _ in pairs])
    b = torch.cat([r.double().reshape(-1) for _, r in pairs])
    if a.numel() == 0:
        return {}
    d = a - b
    return {"mean_abs": float(d.abs().mean()), "max_abs": float(d.abs().max()),
            "k3_kl": float((torch.exp(d) - d - 1.0).mean())}


#: ``loss`` fields the trainer uses itself; every other field of LossConfig is a keyword argument of
#: K3 (``tspo_kernels.fused_linear_pg_loss``) of the same name, so a new K3 option needs only its
#: LossConfig field and its check (tests/test_config.py holds the names to K3's signature)
TRAINER_LOSS_FIELDS = ("kl_coef", "agg", "chunk_size")


def loss_kwargs(lo: LossConfig, *, ref_logp: Optional[torch.Tensor] = None,
                rollout_logp: Optional[torch.Tensor] = None) -> Dict[str, Any]:
    """K3's keyword arguments from the ``loss`` section (the one place they are built): every
    field but :data:`TRAINER_LOSS_FIELDS` under its own name; ``beta`` = ``kl_coef`` where the
    reference log-probs ``ref_logp`` are given (0 otherwise); ``rollout_logp`` only with ``tis_cap``."""
    kw: Dict[str, Any] = {f.name: getattr(lo, f.name) for f in dataclasses.fields(lo)
                          if f.name not in TRAINER_LOSS_FIELDS}
    kw.update(ref_logp=ref_logp, beta=lo.kl_coef if ref_logp is not None else 0.0,
              rollout_logp=rollout_logp if lo.tis_cap is not None else None)
    return kw


def ppo_update(engine, plan: UpdatePlan, cfg: Config) -> UpdateStats:
    """PPO epochs over the plan's mini-batches; one optimizer step per mini-batch."""
    t, lo = cfg.train, cfg.loss
    world = world_size()
    stats = UpdateStats()
    pairs = []
    n_steps = 0
    for epoch in range(t.ppo_epochs):
        for mini, norm in zip(plan.minis, plan.normalizers):
            for mb in mini:
                old = None if plan.on_policy else mb.old_logp
                out = engine(**policy_inputs(engine, mb), mode="loss", old_logp=old, advantages=mb.advantages,
                             weights=mb.weights, normalizer=norm,
                             **loss_kwargs(lo, ref_logp=mb.ref_logp, rollout_logp=mb.rollout_logp))
                # cancel DeepSpeed's mean over ranks: the gradient is the global sum / norm
                engine.backward(out.loss * world, scale_wrt_gas=False)
                n = int(out.logp.numel())
                if epoch == 0:
                    sel = mb.loss_mask[:, 1:].bool()
                    trainer_logp = out.logp if plan.on_policy else mb.old_logp[:, 1:][sel]
                    pairs.append((trainer_logp.detach(), mb.rollout_logp[:, 1:][sel]))
                    if stats.before_logp is None:
                        stats.before_logp = pairs[0][0]
                stats.loss += float(out.loss.detach())
                stats.kl += float(out.kl.sum()) if n else 0.0
                stats.entropy += float(out.entropy.sum()) if n else 0.0
                stats.clip_frac += float(out.clip_frac) * n
                stats.tokens += n
            engine.step()
            gn = engine.get_global_grad_norm()
            stats.grad_norm += float(gn) if gn is not None else 0.0
            n_steps += 1
    tok = max(stats.tokens, 1)
    stats.kl /= tok
    stats.entropy /= tok
    stats.clip_frac /= tok
    stats.grad_norm /= max(n_steps, 1)
    stats.loss /= max(t.ppo_epochs, 1)
    stats.mismatch = rollout_mismatch(pairs)
    return stats
