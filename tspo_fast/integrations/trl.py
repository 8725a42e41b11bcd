"""TSPO inside TRL's ``GRPOTrainer`` (written against TRL 1.16).

:class:`TSPOGRPOTrainer` is a drop-in subclass.  It keeps TRL's generation (vLLM or
``generate``, tools, environments or a ``rollout_func``), reward functions, reference model
and logging, and replaces two things:

1. **Advantages** (docs/algorithm.md §2-§3).  After TRL has generated and scored a batch, turns are read
   off TRL's ``tool_mask`` (1 = policy tokens, 0 = tool / environment output; a
   ``rollout_func`` sets it through its ``env_mask`` key): turn k = the k-th run of policy
   tokens and the observation that follows it.  The outcome R_i is TRL's weighted sum of the
   reward functions; FOLR's first-occurrence turn k*_i comes from kernel K1 on the completion
   token ids and the example's gold answers (dataset column ``answers_column``).  Kernel K2
   turns (R, k*, K, prompt group) into per-turn advantages, which are written on each turn's
   policy tokens as a (B, C) tensor (TRL's loss accepts (B, C) advantages).
2. **Loss** (docs/algorithm.md §4).  ``compute_loss`` runs the model body and hands the final hidden states
   of the trained tokens and the LM-head weight to kernel K3 (``fused_linear_pg_loss``):
   the clipped surrogate, KL and its gradient without (N, V) logits and without recomputing
   the head in backward.  The head is called as a module (its ``forward`` is swapped for the
   call), so DDP / DeepSpeed hooks see an ordinary forward.  On-policy steps (TRL keeps no
   pi_old) pass ``old_logp=None``: K3 takes pi_old = pi, with no extra log-prob pass.  Normalisers are TRL's for
   ``loss_type`` in ``"dapo"`` (default: global token mean), ``"grpo"`` (sequence mean of token
   means, through K3's per-token ``weights``), ``"bnpo"`` and ``"dr_grpo"``.

With ``advantage_mode="grpo"`` and one advantage per sequence the loss equals TRL's own
(tests/test_integration_trl.py checks it against ``GRPOTrainer``'s code path).  TRL features
the fused loss does not reproduce raise ``NotImplementedError`` at construction.
"""
from __future__ import annotations

import contextlib
import types
from typing import Any, Dict, List, Optional

import torch
from torch.distributed.tensor import DTensor

import tspo_kernels as tk

from ..algo.rewards import outcome_reward
from .segments import Turns, turns_from_action_mask

try:
    from trl import GRPOTrainer
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("tspo_fast.integrations.trl needs TRL (pip install 'trl>=1.16')") from exc

__all__ = ["TSPOGRPOTrainer", "outcome_reward_func", "turn_level_advantages"]

_LOSS_TYPES = ("dapo", "grpo", "bnpo", "dr_grpo")


def _text(completion) -> str:
    """A TRL completion as text: a string, or the concatenated contents of its messages."""
    if isinstance(completion, str):
        return completion
    parts = []
    for message in completion:
        content = message.get("content", "") if isinstance(message, dict) else message
        parts.append(content if isinstance(content, str) else str(content))
    return "".join(parts)


def outcome_reward_func(kind: str = "em", answers_column: str = "golden_answers"):
    """A TRL reward function giving docs/algorithm.md §2's outcome R_i: EM (``kind="em"``) or token F1
    (``"f1"``) of the last ``<answer>...</answer>`` against the aliases in ``answers_column``."""
    if kind not in ("em", "f1"):
        raise ValueError(f"kind must be 'em' or 'f1', got {kind!r}")

    def reward(completions, **kwargs):
        if answers_column not in kwargs:
            raise KeyError(f"the outcome reward needs the dataset column {answers_column!r}")
        gold = kwargs[answers_column]
        return [outcome_reward(_text(c), [g] if isinstance(g, str) else list(g), kind)
                for c, g in zip(completions, gold)]

    reward.__name__ = f"tspo_outcome_{kind}"
    return reward


def turn_level_advantages(outcome: torch.Tensor, first_turn: torch.Tensor, num_turns: torch.Tensor,
                          turns: Turns, action_mask: torch.Tensor, num_generations: int, *, rows: slice,
                          **k2_options) -> torch.Tensor:
    """Per-token TSPO advantages (b, C) float32 for ``rows`` of a batch of prompt groups.

    outcome (B,) float, first_turn (B,) int (-1: none), num_turns (B,) int: *all* rows (every
    process), grouped in consecutive blocks of ``num_generations`` rows (TRL's layout).
    turns / action_mask (b, C): this process's segmentation, b = len(rows).  k2_options:
    ``tspo_kernels.turn_advantages`` options (alpha, gamma, mode, norm, eps).
    """
    B = outcome.shape[0]
    dev = outcome.device
    groups = torch.arange(B, device=dev) // num_generations
    T = max(int(num_turns.max()) if B else 1, 1)
    no_tokens = torch.full((B, 1), -1, dtype=torch.long, device=dev)     # per-row results only
    _, turn_adv = tk.turn_advantages(outcome.float(), first_turn.long(), num_turns.long(), groups, no_tokens,
                                     torch.zeros_like(no_tokens, dtype=torch.bool), max_turns=T, **k2_options)
    t = turns.turn_id
    inside = action_mask.bool() & (t >= 0) & (t < T)
    local = turn_adv[rows].to(t.device)
    return torch.where(inside, local.gather(1, t.clamp(0, T - 1)), torch.zeros((), device=t.device))


def _is_dtensor(x) -> bool:
    return isinstance(x, DTensor)


@contextlib.contextmanager
def _head_forward(head: torch.nn.Module, fn):
    """Temporarily replace ``head.forward`` by ``fn(head, hidden)``."""
    had = "forward" in head.__dict__
    previous = head.__dict__.get("forward")
    head.forward = types.MethodType(fn, head)
    try:
        yield
    finally:
        if had:
            head.forward = previous
        else:
            del head.forward


class TSPOGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` with TSPO turn-level advantages (K1 + K2) and the fused K3 loss.

    Extra keyword arguments (everything else goes to ``GRPOTrainer``):

    answers_column   dataset column with the gold answer aliases (list of str, or str);
                     needed unless ``folr_alpha == 0`` or ``advantage_mode == "grpo"``
    folr_alpha       FOLR partial reward alpha (docs/algorithm.md §2; 0.5)
    folr_source      where K1 looks: "observation" (default), "action" or "any"
    gamma, advantage_mode ("tspo" | "grpo"), advantage_norm ("group" | "turn"), advantage_eps
                     docs/algorithm.md §3 options of K2
    kl_clamp         K3's clamp of the k3 KL (docs/algorithm.md §4; TRL itself does not clamp)
    chunk_size       K3 token rows per chunk (None: automatic)
    """

    def __init__(self, *args, answers_column: str = "golden_answers", folr_alpha: float = 0.5,
                 folr_source: str = "observation", gamma: float = 1.0, advantage_mode: str = "tspo",
                 advantage_norm: str = "group", advantage_eps: float = 1e-6, kl_clamp: float = 10.0,
                 chunk_size: Optional[int] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.answers_column = answers_column
        self.folr_alpha = float(folr_alpha)
        self.folr_source = folr_source
        self.tspo_k2 = dict(alpha=self.folr_alpha, gamma=float(gamma), mode=advantage_mode, norm=advantage_norm,
                            eps=float(advantage_eps))
        self.kl_clamp = float(kl_clamp)
        self.chunk_size = chunk_size
        self._tspo_rewards: Optional[torch.Tensor] = None
        self._check_supported()

    # ------------------------------------------------------------------ configuration
    def _check_supported(self) -> None:
        args = self.args
        unsupported = {
            f"loss_type={self.loss_type!r} (supported: {', '.join(_LOSS_TYPES)})": self.loss_type not in _LOSS_TYPES,
            "importance_sampling_level='sequence'": args.importance_sampling_level != "token",
            "top_entropy_quantile < 1": self.top_entropy_quantile < 1.0,
            "off_policy_mask_threshold": self.off_policy_mask_threshold is not None,
            "delta (two-sided clipping)": getattr(args, "delta", None) is not None,
            "beta != 0 with use_bias_correction_kl=True (set it to False)":
                self.beta != 0.0 and bool(getattr(args, "use_bias_correction_kl", False)),
            "an entropy bonus (entropy_coef / adaptive entropy)": bool(getattr(self, "_entropy_bonus_enabled", False)),
            "the MoE router aux loss": bool(getattr(self, "aux_loss_enabled", False)),
            "vllm_importance_sampling_mode other than 'token_truncate' with clip_min unset":
                self.use_vllm and self.vllm_importance_sampling_correction and (
                    self.vllm_importance_sampling_mode != "token_truncate"
                    or self.vllm_importance_sampling_clip_min not in (None, 0.0)),
        }
        bad = [name for name, hit in unsupported.items() if hit]
        if bad:
            raise NotImplementedError("TSPOGRPOTrainer (fused K3 loss) does not support: " + "; ".join(bad))
        cfg = self._lm().config.get_text_config()
        for attr in ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                     "logits_scaling"):
            if getattr(cfg, attr, None) not in (None, 1.0):
                raise NotImplementedError(f"TSPOGRPOTrainer: models with {attr} in their config are not supported "
                                          "(K3 computes plain softmax(h W^T + b) / temperature)")
        if self.tspo_k2["mode"] not in ("tspo", "grpo"):
            raise ValueError(f"advantage_mode must be 'tspo' or 'grpo', got {self.tspo_k2['mode']!r}")

    def _lm(self, model=None) -> torch.nn.Module:
        """The underlying causal LM (unwrapped from DDP / DeepSpeed / PEFT)."""
        lm = self.accelerator.unwrap_model(model if model is not None else self.model)
        return lm.get_base_model() if hasattr(lm, "get_base_model") else lm

    # ------------------------------------------------------------------ advantages
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._tspo_rewards = rewards          # (all processes' rows, reward functions)
        return rewards

    def _generate_and_score_completions(self, inputs: List[Dict[str, Any]]) -> Dict[str, Any]:
        out = super()._generate_and_score_completions(inputs)
        out["advantages"] = self._tspo_advantages(inputs, out)
        return out

    def _first_turns(self, inputs, completion_ids: torch.Tensor, turns: Turns) -> torch.Tensor:
        """FOLR k* per local row (K1), -1 when alpha is 0 or in GRPO mode."""
        b = completion_ids.shape[0]
        if self.folr_alpha == 0.0 or self.tspo_k2["mode"] == "grpo":
            return torch.full((b,), -1, dtype=torch.long, device=completion_ids.device)
        for x in inputs:
            if self.answers_column not in x:
                raise KeyError(f"TSPO's FOLR reward needs the gold answers of each example: column "
                               f"{self.answers_column!r} is missing (columns: {sorted(x)}); pass answers_column=...")
        k_star, _ = tk.first_occurrence_of_aliases(completion_ids, turns.turn_id, turns.is_obs,
                                                   [x[self.answers_column] for x in inputs], self._tokenizer,
                                                   source=self.folr_source)
        return k_star

    def _tspo_advantages(self, inputs, out: Dict[str, Any]) -> torch.Tensor:
        completion_mask = out["completion_mask"].bool()
        tool_mask = out.get("tool_mask")
        action = completion_mask if tool_mask is None else completion_mask & tool_mask.bool()
        turns = turns_from_action_mask(action, completion_mask)
        first = self._first_turns(inputs, out["completion_ids"], turns)
        rpf = self._tspo_rewards
        outcome = (rpf * self.reward_weights.to(rpf.device)[None]).nansum(dim=1)
        first_all = self.accelerator.gather(first).to(outcome.device)
        turns_all = self.accelerator.gather(turns.num_turns).to(outcome.device)
        mode = "train" if self.model.training else "eval"
        n_gen = self.num_generations if mode == "train" else self.num_generations_eval
        b = action.shape[0]
        rows = slice(self.accelerator.process_index * b, (self.accelerator.process_index + 1) * b)
        adv = turn_level_advantages(outcome, first_all, turns_all, turns, action, n_gen, rows=rows, **self.tspo_k2)
        self._metrics[mode]["tspo/folr_hit"].append(float((first_all >= 0).float().mean()))
        self._metrics[mode]["tspo/turns"].append(float(turns_all.float().mean()))
        return adv

    # ------------------------------------------------------------------ loss
    def _normalizer(self, inputs, mask: torch.Tensor, mode: str):
        """(normaliser, per-token weights (b, C) or None) reproducing TRL's loss_type scaling."""
        gas = self.current_gradient_accumulation_steps if mode == "train" else 1
        b = mask.shape[0]
        if self.loss_type == "dapo":
            norm = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                norm = norm * self.current_gradient_accumulation_steps / self.args.steps_per_generation
            return norm.float(), None
        if self.loss_type == "bnpo":
            return mask.sum().clamp(min=1.0).float() * gas, None
        if self.loss_type == "dr_grpo":
            return float(b * self.max_completion_length * gas), None
        lens = mask.sum(1, keepdim=True).clamp(min=1.0).float()          # "grpo": seq mean of token means
        return float(b * gas), (1.0 / lens).expand(mask.shape)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs:
            raise ValueError("TSPOGRPOTrainer does not support returning outputs")
        return self._fused_loss(model, inputs)

    def _fused_loss(self, model, inputs):
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
        C = completion_ids.shape[1]
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        sel = mask.bool()
        adv = inputs["advantages"]
        adv = adv[:, None].expand(sel.shape) if adv.dim() == 1 else adv
        mode = "train" if self.model.training else "eval"
        normalizer, weights = self._normalizer(inputs, mask, mode)
        old = inputs.get("old_per_token_logps")
        ref = inputs.get("ref_per_token_logps") if self.beta != 0.0 else None
        rollout = None
        if self.use_vllm and self.vllm_importance_sampling_correction:
            sampling = inputs["sampling_per_token_logps"]
            rollout = torch.where(torch.isnan(sampling), old, sampling)[sel].float()
        tis_cap = None
        if rollout is not None:                             # TRL's "token_truncate": min(ratio, clip_max)
            cap = self.vllm_importance_sampling_clip_max
            tis_cap = float(cap) if cap is not None else 1e30
        targets = completion_ids[sel]
        pick = lambda x: None if x is None else x[sel].float()
        result = {}
        trainer = self

        def fused_head(head, hidden):                       # hidden (b, C + 1, H)
            h = hidden[:, :-1][sel]
            w, bias = head.weight, head.bias
            if _is_dtensor(w):                              # FSDP2: gather the head, as TRL's own fused head does
                w = w.full_tensor()
                bias = None if bias is None else bias.full_tensor()
            if trainer.args.cast_lm_head_to_fp32:
                h, w = h.float(), w.float()
                bias = None if bias is None else bias.float()
            else:
                h = h.to(w.dtype)
            with torch.autocast(h.device.type, enabled=False):
                # old None (TRL skips pi_old when on-policy): K3 takes pi_old = pi, ratio 1
                out = tk.fused_linear_pg_loss(
                    h, w, targets, pick(old), pick(adv), torch.ones_like(targets, dtype=torch.bool), bias=bias,
                    ref_logp=pick(ref), rollout_logp=rollout, eps_low=trainer.epsilon_low,
                    eps_high=trainer.epsilon_high, beta=trainer.beta if ref is not None else 0.0,
                    kl_clamp=trainer.kl_clamp,
                    tis_cap=tis_cap,
                    temperature=trainer.temperature, normalizer=normalizer, weights=pick(weights),
                    chunk_size=trainer.chunk_size)
            result["out"] = out
            return out.loss                                 # becomes outputs.logits; unused

        head = self._lm(model).get_output_embeddings()
        with _head_forward(head, fused_head), self.accelerator.autocast():
            model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=C + 1, use_cache=False)
        out = result["out"]
        self._log_loss_metrics(out, mode)
        return out.loss

    def _log_loss_metrics(self, out, mode: str) -> None:
        n = torch.tensor(float(out.logp.numel()), device=out.loss.device)
        stats = torch.stack([out.entropy.sum().to(n), out.kl.sum().to(n), out.clip_frac.detach().to(n) * n, n])
        tot = self.accelerator.reduce(stats, reduction="sum")
        count = tot[3].clamp(min=1.0)
        self._metrics[mode]["entropy"].append(float(tot[0] / count))
        if self.beta != 0.0:
            self._metrics[mode]["kl"].append(float(tot[1] / count))
        self._metrics[mode]["clip_ratio/region_mean"].append(float(tot[2] / count))
