"""The divergence guard: after each step, decide whether training may go on and whether the step
may be saved.

Two health checks judge the **result** of each update, before any checkpoint is written (and so
before pruning), on every rank alike (they are collective):

* **finite parameters** (:func:`parameter_health`): the norm of every trained parameter, from each
  rank's ZeRO shard, reduced over ranks; a parameter whose norm is not finite holds NaN/inf (or
  values beyond ~1e19, whose squares overflow), and is named with its count of non-finite values;
* **the update's size** (:func:`update_kl`): the step's first micro-batch is run again through the
  updated policy, and the k3 estimate of KL(pi_before || pi_after) per loss token is taken against
  its log-probs before the update.  Measured on the embedded default (``configs/tiny.yaml``, 24
  steps): a median of 5e-4 nats per token and at most 0.03; an update that wrecked the weights
  (``train.lr=1e6``, their norm 146 -> 4e8): 7.  The threshold is ``train.max_update_kl``
  (default 1.0 nats per token; 0 turns this check, and its forward pass, off).

A step is *healthy* when every ``loss/*`` metric and ``train/grad_norm`` are finite, DeepSpeed
applied every optimizer step of it, and both checks pass.  The guard stops the run
(:class:`DivergenceError`, naming the step, what failed, and the likely config fields) when

* a loss is non-finite (the current weights give NaN/inf on this batch);
* the grad norm is non-finite on a step DeepSpeed applied (the weights took a non-finite update);
* a trained parameter is non-finite after the update, or the update's KL is over the threshold;
* ``train.max_skipped_steps`` consecutive steps had an optimizer step skipped (DeepSpeed skips a
  step whose gradients are non-finite: "OVERFLOW! Skipping step"; the weights did not move).

The trainer writes no checkpoint for a step that is not healthy, so nothing broken is saved over
something good, and pruning never deletes the newest checkpoint of a healthy step (docs/reliability.md).
"""
from __future__ import annotations

import math
import numbers
from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist

from ..config import Config
from .ppo import policy_inputs

__all__ = ["DivergenceError", "DivergenceGuard", "parameter_health", "update_kl", "describe_nonfinite"]


class DivergenceError(RuntimeError):
    """Training diverged; the message names the step, what was non-finite and the likely fields."""


# ----------------------------------------------------------------------------- the checks
def _local_shard(p: torch.Tensor) -> Tuple[torch.Tensor, bool]:
    """(this rank's values of ``p``, whether they are a partition to be summed over ranks):
    ZeRO-3 keeps each rank's share in ``ds_tensor``; other stages keep a full copy on every rank."""
    shard = getattr(p, "ds_tensor", None)
    if shard is not None:
        return shard, True
    return p.data, False


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
        moved = t.to(dev)
        dist.all_reduce(moved)
        return moved.to(t.device)
    return t


def parameter_health(module: torch.nn.Module, trainable_only: bool = True) -> Tuple[float, Dict[str, int]]:
    """(norm of the parameters, {name: non-finite value count} of those whose norm is not finite).

    Collective (every rank calls it; the answer is the same on every rank).  One norm per
    parameter over the rank's own shard, in the parameter's dtype (no copy), reduced over ranks in
    float64; only a parameter whose norm is not finite is read a second time, to count its NaN/inf
    values (a count of 0 means finite values too large for a finite norm)."""
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad or not trainable_only]
    if not named:
        return 0.0, {}
    part = torch.zeros(len(named), dtype=torch.float64)
    rep = torch.zeros(len(named), dtype=torch.float64)
    for i, (_, p) in enumerate(named):
        shard, partitioned = _local_shard(p)
        if shard.numel():
            sq = float(torch.linalg.vector_norm(shard.detach())) ** 2
            (part if partitioned else rep)[i] = sq
    sq = _all_reduce_sum(part) + rep
    bad = [i for i in range(len(named)) if not math.isfinite(float(sq[i]))]
    counts: Dict[str, int] = {}
    if bad:
        part = torch.zeros(len(bad), dtype=torch.float64)
        rep = torch.zeros(len(bad), dtype=torch.float64)
        for j, i in enumerate(bad):
            shard, partitioned = _local_shard(named[i][1])
            (part if partitioned else rep)[j] = float((~torch.isfinite(shard.detach())).sum()) if shard.numel() else 0.0
        n = _all_reduce_sum(part) + rep
        counts = {named[i][0]: int(n[j]) for j, i in enumerate(bad)}
    total = float(sq.sum())
    return (math.sqrt(total) if math.isfinite(total) else float("inf")), counts


def describe_nonfinite(counts: Dict[str, int]) -> str:
    """``counts`` of :func:`parameter_health` as one clause naming the first parameters."""
    parts = [f"{name} ({n:,} NaN/inf value(s))" if n else f"{name} (values too large for a finite norm)"
             for name, n in list(counts.items())[:3]]
    more = f" and {len(counts) - 3} more parameter(s)" if len(counts) > 3 else ""
    return ", ".join(parts) + more


def update_kl(engine, mb, before: Optional[torch.Tensor]) -> float:
    """k3 estimate of KL(pi_before || pi_after) per loss token of the micro-batch ``mb``, averaged
    over ranks (collective: every rank runs one forward of its own micro-batch).  ``before``: the
    log-probs of ``mb``'s loss tokens under the weights before the update (flattened, in loss-mask
    order; None, the same on every rank, when the step ran no micro-batch: 0.0, nothing is run)."""
    if before is None:
        return 0.0
    was_training = engine.module.training
    engine.module.eval()
    with torch.no_grad():
        lp, _ = engine(**policy_inputs(engine, mb), mode="logprobs")
    engine.module.train(was_training)
    sel = mb.loss_mask[:, 1:].bool()
    d = lp[:, 1:][sel].double() - before.detach().double().reshape(-1).to(lp.device)
    k3 = torch.expm1(d) - d
    stats = _all_reduce_sum(torch.tensor([float(k3.sum()), float(k3.numel())], dtype=torch.float64))
    total, count = float(stats[0]), float(stats[1])
    return total / count if count else 0.0


# ----------------------------------------------------------------------------- the guard
class DivergenceGuard:
    """Keeps the count of consecutive overflow-skipped steps and the last healthy step."""

    def __init__(self, cfg: Config, start_step: int = 0):
        self.cfg = cfg
        self.max_skipped = cfg.train.max_skipped_steps
        self.max_update_kl = cfg.train.max_update_kl
        self.skipped_in_a_row = 0
        self.last_healthy_step: Optional[int] = start_step if start_step > 0 else None
        self.last_finite_grad_norm: Optional[float] = None

    def check(self, step: int, metrics: Dict[str, float], *, skipped: int = 0,
              nonfinite: Optional[Dict[str, int]] = None) -> bool:
        """True when ``step`` was healthy; False for a tolerated overflow-skipped step; raises
        :class:`DivergenceError` when the run must stop.  ``skipped``: optimizer steps DeepSpeed
        skipped during this step; ``nonfinite``: :func:`parameter_health`'s parameters that are not
        finite after the update; ``metrics["train/update_kl"]``: :func:`update_kl` of the step."""
        bad = sorted(k for k, v in metrics.items() if k.startswith("loss/") and isinstance(v, numbers.Real)
                     and not math.isfinite(float(v)))
        if bad:
            raise DivergenceError(self._message(step, f"{bad[0]} is {metrics[bad[0]]}"))
        if nonfinite:
            raise DivergenceError(self._message(step, "the update left non-finite weights: "
                                                + describe_nonfinite(nonfinite)))
        kl = metrics.get("train/update_kl")
        if kl is not None and self.max_update_kl > 0 and not float(kl) <= self.max_update_kl:
            raise DivergenceError(self._message(
                step, f"the update moved the policy by KL {float(kl):.4g} nats per token on the step's own batch "
                      f"(train/update_kl; train.max_update_kl is {self.max_update_kl:g})"))
        gn = metrics.get("train/grad_norm")
        finite_gn = gn is None or math.isfinite(float(gn))
        if skipped:
            self.skipped_in_a_row += 1
            if self.skipped_in_a_row >= self.max_skipped:
                raise DivergenceError(self._message(
                    step, f"{self.skipped_in_a_row} consecutive step(s) with an optimizer step skipped for non-finite "
                          f"gradients (train/grad_norm {gn}; train.max_skipped_steps is {self.max_skipped})"))
            return False
        if not finite_gn:
            raise DivergenceError(self._message(step, f"train/grad_norm is {gn} and the optimizer step was applied"))
        self.skipped_in_a_row = 0
        self.last_healthy_step = step
        self.last_finite_grad_norm = gn
        return True

    def _message(self, step: int, what: str) -> str:
        t, m = self.cfg.train, self.cfg.model
        likely = [f"train.lr={t.lr:g}" + (" is unusually high (Search-R1 uses 1e-6, the embedded default 3e-4)"
                                           if t.lr > 1e-3 else " (lower it)")]
        if m.dtype != "float32":
            likely.append(f"model.dtype={m.dtype}" + ("" if t.bf16 else " without train.bf16: true (optimizer "
                                                                        "states in bf16)") + " (try float32)")
        if not t.grad_clip:
            likely.append("train.grad_clip=0 (no clipping)")
        since = (f"the last healthy step was {self.last_healthy_step}" + (
            f" (grad norm {self.last_finite_grad_norm:.4g})" if self.last_finite_grad_norm is not None else "")
                 if self.last_healthy_step is not None else "no step of this run was healthy")
        return f"training diverged at step {step}: {what}; {since}; likely field: {'; '.join(likely)}"
