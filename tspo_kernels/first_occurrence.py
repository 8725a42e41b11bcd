"""K1: first occurrence of a gold answer's token spelling, per trajectory (docs/algorithm.md §2, §5).

One Triton program per row scans the row in blocks of ``BLOCK_L`` tokens.  For each of the
row's patterns it compares the block shifted by j with the pattern's j-th token; only if any
start survives does it check that the whole window lies in one segment of the selected kind.
The best match is kept as the key ``turn * L + pos`` (smallest turn, then smallest position).
"""
from __future__ import annotations

from typing import Any, Sequence, Tuple, Union

import torch
import triton
import triton.language as tl

from . import _checks, reference
from .patterns import PackedPatterns, pack_patterns
from .text import alias_list, answer_variants

__all__ = ["PackedPatterns", "first_occurrence", "first_occurrence_of_aliases", "pack_patterns"]

_SOURCE_CODE = {"observation": 0, "action": 1, "any": 2}


@triton.jit
def _first_occurrence_kernel(ids_ptr, turn_ptr, obs_ptr, pat_ptr, voff_ptr, roff_ptr, out_turn_ptr, out_pos_ptr,
                             L, s_ids, s_turn, s_obs,
                             SOURCE: tl.constexpr, BLOCK_L: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    ids_row = ids_ptr + row * s_ids
    turn_row = turn_ptr + row * s_turn
    obs_row = obs_ptr + row * s_obs
    v_lo = tl.load(roff_ptr + row)
    v_hi = tl.load(roff_ptr + row + 1)
    NONE: tl.constexpr = 9223372036854775807
    best = tl.full((), NONE, tl.int64)
    for start in range(0, L, BLOCK_L):
        offs = start + tl.arange(0, BLOCK_L)
        t0 = tl.load(turn_row + offs, mask=offs < L, other=-1).to(tl.int64)
        o0 = tl.load(obs_row + offs, mask=offs < L, other=0).to(tl.int64)
        o0 = tl.where(o0 != 0, 1, 0)
        seg0 = tl.where(t0 >= 0, 2 * t0 + o0, -1)
        sel = t0 >= 0
        if SOURCE == 0:
            sel = sel & (o0 == 1)
        if SOURCE == 1:
            sel = sel & (o0 == 0)
        for v in range(v_lo, v_hi):
            p_lo = tl.load(voff_ptr + v)
            n = tl.load(voff_ptr + v + 1) - p_lo
            ok = sel & (n > 0)
            # token comparison: one shifted load per pattern token
            for j in range(0, n):
                pj = tl.load(pat_ptr + p_lo + j).to(tl.int64)
                tok = tl.load(ids_row + offs + j, mask=offs + j < L, other=-1).to(tl.int64)
                ok = ok & (tok == pj)
            # segment check, only where a start survived
            if tl.max(ok.to(tl.int32), axis=0) > 0:
                for j in range(1, n):
                    m = offs + j < L
                    tj = tl.load(turn_row + offs + j, mask=m, other=-1).to(tl.int64)
                    oj = tl.load(obs_row + offs + j, mask=m, other=0).to(tl.int64)
                    segj = tl.where(tj >= 0, 2 * tj + tl.where(oj != 0, 1, 0), -1)
                    ok = ok & (segj == seg0)
                key = tl.where(ok, t0 * L + offs, NONE)
                best = tl.minimum(best, tl.min(key, axis=0))
    found = best != NONE
    tl.store(out_turn_ptr + row, tl.where(found, best // L, -1))
    tl.store(out_pos_ptr + row, tl.where(found, best % L, -1))


def _first_occurrence_triton(token_ids, turn_id, is_obs, patterns: PackedPatterns, source: str,
                             block_l: int = 1024, out=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Launch K1; ``out`` optionally gives the two (B,) int64 output buffers."""
    B, L = token_ids.shape
    if out is None:
        out = (torch.empty(B, dtype=torch.int64, device=token_ids.device),
               torch.empty(B, dtype=torch.int64, device=token_ids.device))
    out_turn, out_pos = out
    if B == 0 or L == 0:
        out_turn.fill_(-1), out_pos.fill_(-1)
        return out_turn, out_pos
    if is_obs.dtype == torch.bool:
        is_obs = is_obs.view(torch.uint8)
    token_ids, turn_id, is_obs = (x if x.stride(-1) == 1 else x.contiguous() for x in (token_ids, turn_id, is_obs))
    ids, voff, roff = (x.contiguous() for x in (patterns.ids, patterns.offsets, patterns.row_offsets))
    if ids.numel() == 0:  # no pattern tokens at all: give the kernel a valid pointer
        ids = torch.zeros(1, dtype=torch.int32, device=token_ids.device)
    block = min(block_l, max(16, triton.next_power_of_2(max(L, 1))))
    _first_occurrence_kernel[(B,)](
        token_ids, turn_id, is_obs, ids, voff, roff, out_turn, out_pos,
        L, token_ids.stride(0), turn_id.stride(0), is_obs.stride(0),
        SOURCE=_SOURCE_CODE[source], BLOCK_L=block,
    )
    return out_turn, out_pos


def first_occurrence(token_ids: torch.Tensor, turn_id: torch.Tensor, is_obs: torch.Tensor,
                     patterns: PackedPatterns, source: str = "observation", *,
                     backend: str = "auto") -> Tuple[torch.Tensor, torch.Tensor]:
    """First turn (and token position) where a row's answer pattern occurs (K1).

    token_ids (B, L) int, turn_id (B, L) int (-1 on prompt/padding), is_obs (B, L) bool,
    patterns: :class:`PackedPatterns` (``pack_patterns``; per row the spellings from
    ``answer_variants``), source: "observation" (default), "action" or "any".
    A match must lie inside ONE segment (one turn's observation or action) of the selected
    kind; empty patterns never match.

    Returns ``(turn, pos)`` int64 tensors of shape (B,): the smallest matching turn, and the
    first start position within it; -1 where no pattern matches.  Exactly equal to
    ``tspo_kernels.reference.first_occurrence``.
    """
    _checks.first_occurrence_args(token_ids, turn_id, is_obs, patterns, source)
    if not _checks.use_triton(backend, token_ids.device):
        return reference.first_occurrence(token_ids, turn_id, is_obs, patterns, source)
    return _first_occurrence_triton(token_ids, turn_id, is_obs, patterns, source)


def first_occurrence_of_aliases(token_ids: torch.Tensor, turn_id: torch.Tensor, is_obs: torch.Tensor,
                                aliases: Sequence[Union[str, Sequence[str]]], tokenizer: Any,
                                source: str = "observation", *,
                                backend: str = "auto") -> Tuple[torch.Tensor, torch.Tensor]:
    """K1 from gold aliases: spell them with ``tokenizer``, pack them, find the first turn.

    The one place that turns per-row aliases into K1's patterns: ``aliases[b]`` is row b's list
    of gold answers (a bare string counts as a one-alias list); their token spellings come from
    :func:`answer_variants`.  Other arguments and the result as :func:`first_occurrence`.
    """
    if len(aliases) != token_ids.shape[0]:
        raise ValueError(f"aliases has {len(aliases)} rows but token_ids has {token_ids.shape[0]}")
    patterns = pack_patterns([answer_variants(tokenizer, alias_list(a)) for a in aliases], device=token_ids.device)
    return first_occurrence(token_ids, turn_id, is_obs, patterns, source, backend=backend)
