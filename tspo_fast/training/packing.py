"""Micro-batches of the update: rows packed under a token budget (no padding), or padded rows.

A :class:`MicroBatch` is one forward/backward's worth of a rank's rows, moved to the device
once and reused by the pi_old and pi_ref passes and every PPO epoch.

**Packed** (``train.packing: true``): the rows' real tokens are concatenated into one (1, T)
sequence whose ``position_ids`` restart at every row, with the rows' boundaries as
``cu_seqlens``.  Attention never crosses a row: the model runs with the attention
implementation of :func:`packed_attention_implementation` — flash-attention's varlen kernel
(``flash_attention_2``) on CUDA when ``flash_attn`` is installed, elsewhere
:func:`varlen_sdpa_attention`, which runs PyTorch's causal SDPA on each row's block (exact,
no (T, T) mask is ever built).  Rows are assigned to micro-batches by :func:`plan_bins`: every
micro-batch holds at most ``train.max_tokens_per_micro`` tokens, a row is never split (a row
longer than the budget is an error naming it), and every data-parallel rank gets the same
number of micro-batches (ZeRO-3 gathers parameters in every forward: unequal counts would hang).

**Shared prompts** (``train.share_prompts: true``, packed only): the rows of a group (the same
prompt, ``rollout.n`` answers) go into one micro-batch and carry their prompt once: ``[prompt,
answer 1, ..., answer n]``, each answer's ``position_ids`` continuing from the prompt's.  Attention
runs per *segment* (``prefix_segments`` (S, 4): query start and end, start and end of the prefix it
also sees): the prompt attends causally to itself, each answer to the whole prompt and causally to
itself, never to another answer, so every token sees exactly the context it had in its own row.  A
token's prediction comes from the position before it in its row (``pred_index``): an answer's
first token is predicted from the prompt's last position.  The model runs fewer tokens (the
group's prompt once instead of n times) and computes the same log-probs and gradients, up to
rounding (the prompt's keys are shared, not recomputed).  Only :func:`varlen_sdpa_attention`
takes segments; a group longer than the budget is split into parts that each carry the prompt.

**Padded** (``train.packing: false``): ``train.micro_batch_size`` rows right-padded to the
longest of them (not to the longest of the whole batch).

In both layouts a token's loss-mask bit says whether it is trained; the model predicts token t
from position t - 1, and a row's first token is always a prompt token (never in the loss), so
the last position of one packed row never trains on the next row's first token.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from .distributed import global_max

__all__ = ["VARLEN_ATTENTION", "MicroBatch", "varlen_sdpa_attention", "packed_attention_implementation",
           "plan_bins", "balanced_bins", "prompt_groups", "micro_batches"]

VARLEN_ATTENTION = "tspo_varlen"
#: per-token tensors a micro-batch carries, in the batch's (B, L) layout before packing
PER_TOKEN = ("loss_mask", "advantages", "rollout_logp", "weights")


def varlen_sdpa_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: Optional[torch.Tensor], dropout: float = 0.0,
                          scaling: Optional[float] = None, cu_seq_lens_q: Optional[torch.Tensor] = None,
                          sliding_window: Optional[int] = None, prefix_segments: Optional[torch.Tensor] = None,
                          **kwargs):
    """Attention of packed rows: causal SDPA on each row's block of ``query`` (1, heads, T, d).

    ``cu_seq_lens_q`` (rows + 1,) int: row boundaries in the packed sequence (flash-attention's
    convention).  Without it the whole sequence is one causal row.  ``prefix_segments`` (S, 4) int
    (shared prompts, instead of ``cu_seq_lens_q``): per segment ``(q0, q1, k0, k1)``: positions
    ``q0:q1`` attend to ``k0:k1`` (their prompt; empty when k0 == k1) and causally to themselves;
    the segments cover ``0:T`` in order.  Returns ``(output (1, T, heads, d), None)`` as
    transformers' attention functions do.
    """
    if sliding_window is not None:
        raise NotImplementedError("packed attention: sliding-window layers are not supported")
    if query.shape[0] != 1:
        raise ValueError(f"packed attention takes one packed sequence, got batch {query.shape[0]}")
    T = query.shape[2]
    gqa = key.shape[1] != query.shape[1]
    p = dropout if module.training else 0.0
    sdpa = lambda q, k, v, **kw: F.scaled_dot_product_attention(q, k, v, dropout_p=p, scale=scaling, enable_gqa=gqa,
                                                                **kw)
    if prefix_segments is not None:
        out = []
        for q0, q1, k0, k1 in prefix_segments.tolist():
            q = query[:, :, q0:q1]
            if k1 == k0:
                out.append(sdpa(q, key[:, :, q0:q1], value[:, :, q0:q1], is_causal=True))
                continue
            k = torch.cat([key[:, :, k0:k1], key[:, :, q0:q1]], dim=2)
            v = torch.cat([value[:, :, k0:k1], value[:, :, q0:q1]], dim=2)
            n, m = q1 - q0, k1 - k0
            mask = torch.ones(n, m + n, dtype=torch.bool, device=query.device)
            mask[:, m:] = torch.ones(n, n, dtype=torch.bool, device=query.device).tril()
            out.append(sdpa(q, k, v, attn_mask=mask))
        return torch.cat(out, dim=2).transpose(1, 2).contiguous(), None
    bounds = [0, T] if cu_seq_lens_q is None else [int(x) for x in cu_seq_lens_q.tolist()]
    out = [sdpa(query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], is_causal=True)
           for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    return torch.cat(out, dim=2).transpose(1, 2).contiguous(), None


def _no_mask(*args, **kwargs):
    """The packed attention builds no mask: row boundaries travel as ``cu_seq_lens_q``."""
    return None


AttentionInterface.register(VARLEN_ATTENTION, varlen_sdpa_attention)
AttentionMaskInterface.register(VARLEN_ATTENTION, _no_mask)


def packed_attention_implementation() -> str:
    """``flash_attention_2`` on CUDA with ``flash_attn`` installed, else :data:`VARLEN_ATTENTION`."""
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return VARLEN_ATTENTION


# ----------------------------------------------------------------------------- planning
def plan_bins(lengths: Sequence[int], budget: int, n_bins: int = 1, names: Optional[Sequence] = None) -> List[List[int]]:
    """Rows (indices into ``lengths``) per micro-batch: at least ``n_bins`` bins, each holding at
    most ``budget`` tokens, rows never split.  Longest rows first, each into the least-filled bin
    it fits (a new bin when none does); bins hold their rows in index order; deterministic."""
    for i, n in enumerate(lengths):
        if n > budget:
            who = f"uid {names[i]!r}" if names is not None else f"row {i}"
            raise ValueError(f"train.max_tokens_per_micro: {who} has {n} tokens, more than the budget of {budget} "
                             "tokens per micro-batch (rows are never split): raise the budget")
    m = max(int(n_bins), -(-sum(lengths) // budget) if len(lengths) else 0, 1)
    while True:
        loads, bins = [0] * m, [[] for _ in range(m)]
        ok = True
        for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
            fits = [b for b in range(m) if loads[b] + lengths[i] <= budget]
            if not fits:
                ok = False
                break
            b = min(fits, key=lambda b: (loads[b], b))
            loads[b] += lengths[i]
            bins[b].append(i)
        if ok:
            return [sorted(b) for b in bins]
        m += 1


def balanced_bins(lengths: Sequence[int], budget: int, names: Optional[Sequence] = None) -> List[List[int]]:
    """:func:`plan_bins` with the same number of bins on every data-parallel rank (collective)."""
    n = len(plan_bins(lengths, budget, 1, names))
    while True:
        target = int(global_max(n))
        bins = plan_bins(lengths, budget, target, names)
        n = len(bins)
        if int(global_max(n)) == target == n:
            return bins


# ----------------------------------------------------------------------------- micro-batches
@dataclass
class MicroBatch:
    """One forward/backward of some of a rank's rows, on the device.

    rows: the rows' indices in the rank's batch.  ``input_ids`` and every per-token tensor are
    (1, T) when packed (T = the rows' real tokens) or (r, L) when padded (L = their longest).
    ``position_ids`` / ``cu_seqlens`` / ``max_seqlen`` are set when packed, ``attention_mask``
    when padded.  ``old_logp`` / ``ref_logp`` are filled by the log-prob passes (None: not
    computed).  Shared prompts: ``prefix_segments`` and ``pred_index`` (1, T) (the position
    that predicts each token) instead of ``cu_seqlens``, and ``spans`` (per row, its
    ``(packed start, row start, length)`` pieces).  ``trunk``: the output of the policy's frozen
    trunk on these rows, computed by the first pass that needs it
    (:func:`tspo_fast.training.ppo.policy_inputs`).  ``tokens``: real tokens (a shared prompt
    counted once); ``slots``: positions run through the model.
    """

    rows: List[int]
    lengths: List[int]
    input_ids: torch.Tensor
    loss_mask: torch.Tensor
    advantages: torch.Tensor
    rollout_logp: torch.Tensor
    weights: Optional[torch.Tensor] = None
    attention_mask: Optional[torch.Tensor] = None
    position_ids: Optional[torch.Tensor] = None
    cu_seqlens: Optional[torch.Tensor] = None
    max_seqlen: int = 0
    old_logp: Optional[torch.Tensor] = None
    ref_logp: Optional[torch.Tensor] = None
    trunk: Optional[torch.Tensor] = None
    prefix_segments: Optional[torch.Tensor] = None
    pred_index: Optional[torch.Tensor] = None
    spans: Optional[List[List[tuple]]] = None
    tokens: int = 0
    slots: int = 0
    extra: Dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def packed(self) -> bool:
        return self.cu_seqlens is not None or self.prefix_segments is not None

    def take(self, full: torch.Tensor) -> torch.Tensor:
        """This micro-batch's part of a (B, L) per-token tensor of the batch, in its own layout (a
        shared prompt's positions take the values of the first row of its group)."""
        if not self.rows:
            return torch.zeros((1, 1), dtype=full.dtype, device=self.input_ids.device)
        if self.spans is not None:
            part = torch.empty((1, self.slots), dtype=full.dtype)
            for r, pieces in reversed(list(zip(self.rows, self.spans))):     # a group's first row writes last
                for at, start, n in pieces:
                    part[0, at:at + n] = full[r, start:start + n]
            return part.to(self.input_ids.device)
        if self.packed:
            part = torch.cat([full[r, :n] for r, n in zip(self.rows, self.lengths)])[None]
        else:
            part = full[self.rows, :self.input_ids.shape[1]]
        return part.to(self.input_ids.device)

    def scatter(self, part: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
        """Write ``part`` (this micro-batch's layout) back into the (B, L) tensor ``full``; returns ``full``."""
        part = part.to(full.device)
        if self.spans is not None:
            for r, pieces in zip(self.rows, self.spans):
                for at, start, n in pieces:
                    full[r, start:start + n] = part[0, at:at + n]
        elif self.packed:
            off = 0
            for r, n in zip(self.rows, self.lengths):
                full[r, :n] = part[0, off:off + n]
                off += n
        elif self.rows:
            full[self.rows, :part.shape[1]] = part
        return full

    def model_inputs(self) -> Dict[str, object]:
        """Keyword arguments of :class:`~tspo_fast.training.policy.FusedHeadPolicy` for this layout."""
        if self.prefix_segments is not None:
            return dict(input_ids=self.input_ids, attention_mask=None, loss_mask=self.loss_mask,
                        position_ids=self.position_ids, prefix_segments=self.prefix_segments,
                        pred_index=self.pred_index)
        if self.packed:
            return dict(input_ids=self.input_ids, attention_mask=None, loss_mask=self.loss_mask,
                        position_ids=self.position_ids, cu_seqlens=self.cu_seqlens, max_seqlen=self.max_seqlen)
        return dict(input_ids=self.input_ids, attention_mask=self.attention_mask, loss_mask=self.loss_mask)


def _lengths(batch, rows: Sequence[int]) -> List[int]:
    return [int(x) for x in batch.attention_mask[list(rows)].sum(1).tolist()]


def _packed(batch, rows, tensors, device) -> MicroBatch:
    lens = _lengths(batch, rows)
    if not rows:                                   # an empty bin: one pad token, nothing trained
        rows_t, lens = [], [1]
        ids = torch.full((1, 1), 0, dtype=torch.long)
        per = {k: torch.zeros((1, 1), dtype=v.dtype) for k, v in tensors.items()}
    else:
        rows_t = list(rows)
        ids = torch.cat([batch.input_ids[r, :n] for r, n in zip(rows, lens)])[None]
        per = {k: torch.cat([v[r, :n] for r, n in zip(rows, lens)])[None] for k, v in tensors.items()}
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0).tolist()), dtype=torch.int32)
    mb = MicroBatch(rows=rows_t, lengths=lens if rows_t else [], input_ids=ids.to(device), position_ids=pos.to(device), cu_seqlens=cu.to(device),
                    max_seqlen=max(lens), tokens=sum(lens) if rows_t else 0, slots=sum(lens),
                    **{k: v.to(device) for k, v in per.items()})
    return mb


def _prompt_end(batch, row: int, n: int) -> int:
    """Where row ``row`` (of ``n`` real tokens) stops being its prompt: what shared prompts share."""
    return min(int(batch.prompt_len[row]), n)


def _shared_tokens(batch, unit: Sequence[int]) -> int:
    """Tokens of a prompt-sharing unit in the shared layout: its prompt once plus every row's answer."""
    lens = _lengths(batch, unit)
    p = _prompt_end(batch, unit[0], lens[0])
    return p + sum(n - p for n in lens)


def prompt_groups(batch, rows: Sequence[int], budget: int) -> List[List[int]]:
    """``rows`` in units that share a prompt: the rows of one uid whose first ``prompt_len`` tokens
    are the same, in order of first appearance; a unit whose shared length (the prompt once plus
    every row's answer) is over ``budget`` is cut into parts that each carry the prompt."""
    lens = _lengths(batch, rows)
    units: Dict[tuple, List[int]] = {}
    for r, n in zip(rows, lens):
        p = _prompt_end(batch, r, n)
        key = (batch.uids[r], tuple(batch.input_ids[r, :p].tolist()))
        units.setdefault(key, []).append(r)
    out = []
    for (_, prompt), unit in units.items():
        part, load = [], len(prompt)
        for r, n in zip(unit, _lengths(batch, unit)):
            if part and load + n - len(prompt) > budget:
                out.append(part)
                part, load = [], len(prompt)
            part.append(r)
            load += n - len(prompt)
        out.append(part)
    return out


def _shared(batch, units: List[List[int]], tensors, device) -> MicroBatch:
    """One micro-batch of prompt-sharing ``units`` (see the module's docstring)."""
    ids, pos, pred, segs, per = [], [], [], [], {k: [] for k in tensors}
    rows, lens, spans = [], [], []
    off = 0

    def put(r, a, b, predictor):
        nonlocal off
        ids.append(batch.input_ids[r, a:b])
        for k, v in tensors.items():
            per[k].append(v[r, a:b])
        pos.append(torch.arange(a, b))
        pred.append(torch.cat([torch.tensor([predictor]), torch.arange(off, off + b - a - 1)]))
        off += b - a

    for unit in units:
        p = _prompt_end(batch, unit[0], _lengths(batch, unit[:1])[0])
        ps = off
        put(unit[0], 0, p, ps)                      # a prompt's first token is predicted by nothing (never trained)
        segs.append((ps, ps + p, ps, ps))
        for r, n in zip(unit, _lengths(batch, unit)):
            at = off
            put(r, p, n, ps + p - 1)
            if n > p:
                segs.append((at, off, ps, ps + p))
            rows.append(r)
            lens.append(n)
            spans.append([(ps, 0, p), (at, p, n - p)])
    cat = lambda xs: torch.cat(xs)[None].to(device)
    return MicroBatch(rows=rows, lengths=lens, input_ids=cat(ids), position_ids=cat(pos),
                      prefix_segments=torch.tensor(segs, dtype=torch.int64).to(device), pred_index=cat(pred),
                      spans=spans, max_seqlen=max(lens), tokens=off, slots=off,
                      **{k: cat(v) for k, v in per.items()})


def _padded(batch, rows, tensors, device) -> MicroBatch:
    lens = _lengths(batch, rows)
    L = max(lens)
    idx = list(rows)
    return MicroBatch(rows=idx, lengths=lens, input_ids=batch.input_ids[idx, :L].to(device),
                      attention_mask=batch.attention_mask[idx, :L].to(device), tokens=sum(lens), slots=len(idx) * L,
                      **{k: v[idx, :L].to(device) for k, v in tensors.items()})


def micro_batches(batch, rows: Sequence[int], advantages: torch.Tensor, weights: Optional[torch.Tensor], *,
                  packing: bool, budget: int, micro_size: int, device, share_prompts: bool = False) -> List[MicroBatch]:
    """The micro-batches of one mini-batch (``rows`` of the rank's ``batch``), on ``device``.

    advantages (B, L) and weights (len(rows), L) or None are aligned with the batch's tokens.
    Packed: :func:`balanced_bins` under ``budget`` tokens (collective over ranks); with
    ``share_prompts`` the units binned are :func:`prompt_groups`.  Padded: consecutive groups of
    ``micro_size`` rows.
    """
    rows = list(rows)
    tensors = {"loss_mask": batch.loss_mask, "advantages": advantages.float(), "rollout_logp": batch.rollout_logp}
    if weights is not None:
        full = torch.zeros(batch.loss_mask.shape, dtype=torch.float32)
        full[rows] = weights.float()
        tensors["weights"] = full
    if packing and share_prompts:
        units = prompt_groups(batch, rows, budget) if rows else []
        bins = balanced_bins([_shared_tokens(batch, u) for u in units], budget, [batch.uids[u[0]] for u in units])
        return [_shared(batch, [units[i] for i in b], tensors, device) if b else _packed(batch, [], tensors, device)
                for b in bins]
    if packing:
        names = [batch.uids[r] for r in rows]
        bins = balanced_bins(_lengths(batch, rows), budget, names)
        return [_packed(batch, [rows[i] for i in b], tensors, device) for b in bins]
    return [_padded(batch, rows[s:s + micro_size], tensors, device) for s in range(0, len(rows), micro_size)]
