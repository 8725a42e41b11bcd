"""The policy as the trainer sees it: final hidden states + LM head, never the logits.

:class:`FusedHeadPolicy` wraps a Hugging Face causal LM (Qwen2, Llama and other families
whose ``get_decoder()`` returns the transformer body and ``get_output_embeddings()`` the LM
head).  Its forward runs the body, picks the hidden states of the positions that predict a
loss-masked token, and hands them with the head's weight to kernel K3.  The LM head is
*called* as a module whose forward is replaced by the fused loss: under DeepSpeed ZeRO-3 its
pre-forward hook gathers the (partitioned) weight exactly as for an ordinary forward, and
its gradient flows back to the partition.

**The frozen trunk** (``frozen_trunk=k`` > 0; LoRA on the top layers only, ``model.lora.top_layers``):
the embedding and the first ``k`` decoder layers have no trainable parameter, so their output is
the same in every pass of a step (pi_old, pi_ref with the adapters off, each PPO epoch, the
guard's check).  ``mode="trunk"`` returns it (the hidden states entering layer ``k``), and a
forward given ``trunk=`` runs the layers from ``k`` up only: the same operations on the same
values, so the result is identical to a full forward.  Layers are skipped by giving them a
pass-through ``forward`` for the duration of the call: their submodules never run, so ZeRO-3
gathers none of their parameters.
"""
from __future__ import annotations

import contextlib
import types
from typing import Any, Dict, Optional, Sequence

import torch

import tspo_kernels as tk

from .packing import VARLEN_ATTENTION, packed_attention_implementation


def _fused_head_forward(self, hidden: torch.Tensor, fn, kwargs: Dict[str, Any]):
    """Replacement ``forward`` of the LM head: ``fn(hidden, weight, bias=..., **kwargs)``."""
    return fn(hidden, self.weight, bias=self.bias, **kwargs)


def _pass_through(hidden_states, *args, **kwargs):
    """``forward`` of a skipped decoder layer or norm: its input, unchanged."""
    return hidden_states


@contextlib.contextmanager
def _forwards(replaced: Sequence[tuple]):
    """Give each module of ``replaced`` ((module, forward), ...) that ``forward`` for the duration."""
    saved = [(m, m.__dict__.get("forward")) for m, _ in replaced]
    for m, fn in replaced:
        m.forward = fn
    try:
        yield
    finally:
        for m, old in saved:
            if old is None:
                del m.forward
            else:
                m.forward = old


def frozen_trunk_depth(lm: torch.nn.Module) -> int:
    """How many decoder layers at the bottom of ``lm``, with its input embedding, have no trainable
    parameter and no active dropout (0 when the embedding trains, the body has no ``layers`` or the
    model drops out: then nothing below the trained layers is the same from one pass to the next)."""
    body = lm.get_decoder()
    layers = getattr(body, "layers", None)
    emb = lm.get_input_embeddings()
    if layers is None or emb is None or any(p.requires_grad for p in emb.parameters()):
        return 0
    if any(float(getattr(lm.config, k, 0.0) or 0.0) > 0 for k in ("attention_dropout", "hidden_dropout")):
        return 0
    depth = 0
    for layer in layers:
        if any(p.requires_grad for p in layer.parameters()) or any(
                isinstance(m, torch.nn.Dropout) and m.p > 0 for m in layer.modules()):
            break
        depth += 1
    return depth if depth < len(layers) else 0


class FusedHeadPolicy(torch.nn.Module):
    """``forward(input_ids, attention_mask, loss_mask, mode=..., ...)`` on a causal LM.

    Token tensors are (b, L); ``loss_mask[b, t]`` marks token t as trained (predicted from
    position t - 1).  Per-token inputs (``old_logp``, ``advantages``, ``ref_logp``,
    ``rollout_logp``, ``weights``) are aligned with the tokens they score, as in ``RolloutBatch``.

    ``mode="logprobs"``: returns (logp (b, L), entropy (b, L)) float32, 0 off the mask.
    ``mode="loss"``: returns K3's ``PGLossOutput`` over the masked tokens.
    ``mode="trunk"`` (``frozen_trunk`` > 0): returns the hidden states entering decoder layer
    ``frozen_trunk``, (b, L, hidden) in the model's dtype, without a graph; pass them back as
    ``trunk=`` to any mode to run only the layers above.

    Packed rows (``packing=True``, :mod:`tspo_fast.training.packing`): ``input_ids`` (1, T) with
    ``position_ids`` restarting per row, ``cu_seqlens`` (rows + 1,) and ``attention_mask=None``;
    the LM then runs with the varlen attention implementation, so no row attends to another.
    Shared prompts (``share_prompts=True``): ``prefix_segments`` (S, 4) and ``pred_index`` (1, T)
    instead of ``cu_seqlens``; token t is predicted from position ``pred_index[0, t]``.
    """

    def __init__(self, lm: torch.nn.Module, *, chunk_size: int = 1024, temperature: float = 1.0,
                 packing: bool = False, frozen_trunk: int = 0, share_prompts: bool = False):
        super().__init__()
        self.packing = packing
        self.share_prompts = share_prompts
        if share_prompts and not packing:
            raise ValueError("share_prompts needs packing=True")
        self.frozen_trunk = int(frozen_trunk)
        if self.frozen_trunk:
            layers = getattr(lm.get_decoder(), "layers", None)
            if layers is None or not 0 < self.frozen_trunk < len(layers):
                raise ValueError(f"frozen_trunk={frozen_trunk}: the model's body has "
                                 f"{'no layers' if layers is None else f'{len(layers)} layers'}")
        if packing:       # segments (shared prompts): only the SDPA implementation takes them
            lm.set_attn_implementation(VARLEN_ATTENTION if share_prompts else packed_attention_implementation())
        self.lm = lm
        self.chunk_size = chunk_size
        self.temperature = temperature
        head = lm.get_output_embeddings()
        if head is None or not hasattr(head, "weight"):
            raise TypeError(f"{type(lm).__name__} has no linear LM head (get_output_embeddings)")
        head.forward = types.MethodType(_fused_head_forward, head)
        self._head = [head]  # not a submodule twice

    @property
    def config(self):
        return self.lm.config

    def _split(self, trunk: Optional[torch.Tensor], stop: bool):
        """The forwards to replace: above the trunk and the final norm (``stop``: compute the trunk
        only), or the trunk's layers (``trunk`` given: its last layer returns it)."""
        body = self.lm.get_decoder()
        k = self.frozen_trunk
        if stop:
            return [(m, _pass_through) for m in list(body.layers[k:]) + [body.norm]]
        if trunk is None:
            return []
        cached = lambda *args, **kwargs: trunk
        return [(m, _pass_through) for m in body.layers[:k - 1]] + [(body.layers[k - 1], cached)]

    def _hidden(self, input_ids, attention_mask, loss_mask, position_ids=None, cu_seqlens=None, max_seqlen=0,
                trunk=None, stop=False, prefix_segments=None, pred_index=None):
        if (trunk is not None or stop) and not self.frozen_trunk:
            raise ValueError("trunk / mode='trunk' need FusedHeadPolicy(..., frozen_trunk=k > 0)")
        body = self.lm.get_decoder()
        varlen = {}
        if prefix_segments is not None:
            if not self.share_prompts or pred_index is None:
                raise ValueError("shared prompts (prefix_segments) need FusedHeadPolicy(..., share_prompts=True) "
                                 "and pred_index")
            varlen = dict(prefix_segments=prefix_segments)
        elif cu_seqlens is not None:
            if not self.packing:
                raise ValueError("packed rows (cu_seqlens) need FusedHeadPolicy(..., packing=True)")
            varlen = dict(cu_seq_lens_q=cu_seqlens, cu_seq_lens_k=cu_seqlens, max_length_q=max_seqlen,
                          max_length_k=max_seqlen)
        elif self.packing:
            raise ValueError("FusedHeadPolicy(packing=True) takes packed rows: pass position_ids and cu_seqlens")
        with _forwards(self._split(trunk, stop)):
            out = body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
                       **varlen)
        h = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        if stop:
            return h
        sel = loss_mask[:, 1:].bool()
        if pred_index is not None:             # each token's predictor: the position before it in its row
            return h[0, pred_index[0, 1:][sel[0]]], input_ids[:, 1:][sel], sel
        return h[:, :-1][sel], input_ids[:, 1:][sel], sel

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor], loss_mask: torch.Tensor, *,
                position_ids: Optional[torch.Tensor] = None, cu_seqlens: Optional[torch.Tensor] = None,
                max_seqlen: int = 0, prefix_segments: Optional[torch.Tensor] = None,
                pred_index: Optional[torch.Tensor] = None, mode: str = "loss", old_logp: Optional[torch.Tensor] = None,
                advantages: Optional[torch.Tensor] = None, ref_logp: Optional[torch.Tensor] = None,
                rollout_logp: Optional[torch.Tensor] = None, weights: Optional[torch.Tensor] = None,
                normalizer=None, trunk: Optional[torch.Tensor] = None, **loss_options):
        if mode == "trunk":
            with torch.no_grad():
                return self._hidden(input_ids, attention_mask, loss_mask, position_ids, cu_seqlens, max_seqlen,
                                    stop=True, prefix_segments=prefix_segments, pred_index=pred_index)
        if trunk is not None and torch.is_grad_enabled() and getattr(self.lm, "is_gradient_checkpointing", False):
            trunk = trunk.detach().requires_grad_(True)   # a checkpointed layer needs an input with a graph
        hidden, targets, sel = self._hidden(input_ids, attention_mask, loss_mask, position_ids, cu_seqlens, max_seqlen,
                                            trunk=trunk, prefix_segments=prefix_segments, pred_index=pred_index)
        head = self._head[0]
        if mode == "logprobs":
            logp, ent = head(hidden, tk.fused_linear_logprobs,
                             dict(targets=targets, temperature=self.temperature, return_entropy=True,
                                  chunk_size=self.chunk_size))
            full = torch.zeros(input_ids.shape, dtype=torch.float32, device=input_ids.device)
            full_ent = torch.zeros_like(full)
            full[:, 1:][sel] = logp.float()
            full_ent[:, 1:][sel] = ent.float()
            return full, full_ent
        if mode != "loss":
            raise ValueError(f"unknown mode {mode!r}; expected 'loss', 'logprobs' or 'trunk'")
        pick = lambda x: None if x is None else x[:, 1:][sel].float()
        n = targets.shape[0]
        kwargs = dict(targets=targets, old_logp=pick(old_logp), advantages=pick(advantages),
                      loss_mask=torch.ones(n, dtype=torch.bool, device=targets.device),
                      ref_logp=pick(ref_logp), rollout_logp=pick(rollout_logp), weights=pick(weights),
                      normalizer=normalizer,
                      temperature=self.temperature, chunk_size=self.chunk_size, **loss_options)
        return head(hidden, _pg_loss_positional, kwargs)


def _pg_loss_positional(hidden, weight, *, bias=None, targets, old_logp, advantages, loss_mask, **kw):
    return tk.fused_linear_pg_loss(hidden, weight, targets, old_logp, advantages, loss_mask, bias=bias, **kw)
