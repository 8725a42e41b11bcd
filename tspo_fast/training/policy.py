"""The policy as the trainer sees it: final hidden states + LM head, never the logits.

:class:`FusedHeadPolicy` wraps a Hugging Face causal LM (Qwen2, Llama and other families
whose ``get_decoder()`` returns the transformer body and ``get_output_embeddings()`` the LM
head).  Its forward runs the body, picks the hidden states of the positions that predict a
loss-masked token, and hands them with the head's weight to kernel K3.  The LM head is
*called* as a module whose forward is replaced by the fused loss: under DeepSpeed ZeRO-3 its
pre-forward hook gathers the (partitioned) weight exactly as for an ordinary forward, and
its gradient flows back to the partition.
"""
from __future__ import annotations

import types
from typing import Any, Dict, Optional

import torch

import tspo_kernels as tk

from .packing import packed_attention_implementation


def _fused_head_forward(self, hidden: torch.Tensor, fn, kwargs: Dict[str, Any]):
    """Replacement ``forward`` of the LM head: ``fn(hidden, weight, bias=..., **kwargs)``."""
    return fn(hidden, self.weight, bias=self.bias, **kwargs)


class FusedHeadPolicy(torch.nn.Module):
    """``forward(input_ids, attention_mask, loss_mask, mode=..., ...)`` on a causal LM.

    Token tensors are (b, L); ``loss_mask[b, t]`` marks token t as trained (predicted from
    position t - 1).  Per-token inputs (``old_logp``, ``advantages``, ``ref_logp``,
    ``rollout_logp``, ``weights``) are aligned with the tokens they score, as in ``RolloutBatch``.

    ``mode="logprobs"``: returns (logp (b, L), entropy (b, L)) float32, 0 off the mask.
    ``mode="loss"``: returns K3's ``PGLossOutput`` over the masked tokens.

    Packed rows (``packing=True``, :mod:`tspo_fast.training.packing`): ``input_ids`` (1, T) with
    ``position_ids`` restarting per row, ``cu_seqlens`` (rows + 1,) and ``attention_mask=None``;
    the LM then runs with the varlen attention implementation, so no row attends to another.
    """

    def __init__(self, lm: torch.nn.Module, *, chunk_size: int = 1024, temperature: float = 1.0,
                 packing: bool = False):
        super().__init__()
        self.packing = packing
        if packing:
            lm.set_attn_implementation(packed_attention_implementation())
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

    def _hidden(self, input_ids, attention_mask, loss_mask, position_ids=None, cu_seqlens=None, max_seqlen=0):
        body = self.lm.get_decoder()
        varlen = {}
        if cu_seqlens is not None:
            if not self.packing:
                raise ValueError("packed rows (cu_seqlens) need FusedHeadPolicy(..., packing=True)")
            varlen = dict(cu_seq_lens_q=cu_seqlens, cu_seq_lens_k=cu_seqlens, max_length_q=max_seqlen,
                          max_length_k=max_seqlen)
        elif self.packing:
            raise ValueError("FusedHeadPolicy(packing=True) takes packed rows: pass position_ids and cu_seqlens")
        out = body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
                   **varlen)
        h = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        sel = loss_mask[:, 1:].bool()
        return h[:, :-1][sel], input_ids[:, 1:][sel], sel

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor], loss_mask: torch.Tensor, *,
                position_ids: Optional[torch.Tensor] = None, cu_seqlens: Optional[torch.Tensor] = None,
                max_seqlen: int = 0, mode: str = "loss", old_logp: Optional[torch.Tensor] = None,
                advantages: Optional[torch.Tensor] = None, ref_logp: Optional[torch.Tensor] = None,
                rollout_logp: Optional[torch.Tensor] = None, weights: Optional[torch.Tensor] = None,
                normalizer=None, **loss_options):
        hidden, targets, sel = self._hidden(input_ids, attention_mask, loss_mask, position_ids, cu_seqlens, max_seqlen)
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
            raise ValueError(f"unknown mode {mode!r}; expected 'loss' or 'logprobs'")
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
