"""K1: first occurrence of a gold answer's token spelling, per trajectory (docs/algorithm.md §2, §5).

A 2-D grid over (row, block of ``BLOCK_L`` positions).  Each program loads its block of token
ids once, as 32-bit values (an id outside [0, 2^31) can never equal a pattern token and becomes
-1), and compares it with the first token of every pattern of its row, ``BLOCK_P`` patterns at a
time (the *prefilter*: one comparison per position and pattern, one block-wide "any" per
``BLOCK_P`` patterns).  Only where some position survives does it check the pattern's other
tokens and that the window lies in one segment of the selected kind, with loads masked to the
positions still matching (the verification touches memory only there).  Turns and positions stay
32-bit; a program's best match, the key ``turn * L + pos`` (smallest turn, then smallest
position), is formed in 64 bits once, at the end, and goes into a per-row atomic minimum.  The
last program of a row to finish (a per-row atomic countdown) reads that minimum and writes the
row's ``(turn, pos)``.

Both per-row counters live in the two output buffers themselves (``pos`` holds the key,
``turn`` the countdown), initialised by one fill, so a call is one fill and one launch.
Registers and occupancy on Hopper: ``bench/kernel_resources.py`` (bench/RESULTS.md).
"""
from __future__ import annotations

from typing import Any, Sequence, Tuple, Union

import torch
import triton
import triton.language as tl

from . import _checks, reference
from .patterns import PackedPatterns, pack_patterns
from .text import alias_list, answer_variants

__all__ = ["PackedPatterns", "first_occurrence", "first_occurrence_of_aliases", "k1_launch", "pack_patterns"]

_SOURCE_CODE = {"observation": 0, "action": 1, "any": 2}
_NONE = 9223372036854775807          # int64 max: "no match" key and the countdown's start


@triton.jit
def _ids32(x):
    """Token ids as int32; ids outside [0, 2^31) (never a pattern token) become -1."""
    return tl.where((x >= 0) & (x <= 2147483647), x, -1).to(tl.int32)


@triton.jit
def _segment(turn_row, obs_row, pos, mask):
    """(turn, segment code 2 * turn + is_obs; -1 off the turns) at ``pos`` where ``mask``, int32."""
    t = tl.load(turn_row + pos, mask=mask, other=-1).to(tl.int32)
    o = tl.where(tl.load(obs_row + pos, mask=mask, other=0) != 0, 1, 0)
    return t, tl.where(t >= 0, 2 * t + o, -1), o


@triton.jit
def _check_pattern(ids_row, turn_row, obs_row, pat_ptr, p_lo, n, offs, cand, L, SOURCE: tl.constexpr):
    """(turn, ok): where the pattern ``pat[p_lo:p_lo+n]`` starts at ``offs`` inside one segment of
    the selected kind (``cand``: the positions whose first token matched).  Every load is
    masked to the positions still matching."""
    t0, seg0, o0 = _segment(turn_row, obs_row, offs, cand)
    ok = cand & (t0 >= 0)
    if SOURCE == 0:
        ok = ok & (o0 == 1)
    if SOURCE == 1:
        ok = ok & (o0 == 0)
    for j in range(1, n):
        ok = ok & (offs + j < L)
        pj = tl.load(pat_ptr + p_lo + j)
        tok = _ids32(tl.load(ids_row + offs + j, mask=ok, other=-1))
        _, segj, _ = _segment(turn_row, obs_row, offs + j, ok)
        ok = ok & (tok == pj) & (segj == seg0)
    return t0, ok


@triton.jit
def _first_occurrence_kernel(ids_ptr, turn_ptr, obs_ptr, pat_ptr, voff_ptr, roff_ptr, key_ptr, count_ptr,
                             L, n_blocks, s_ids, s_turn, s_obs,
                             SOURCE: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_P: tl.constexpr):
    NONE: tl.constexpr = 9223372036854775807
    BIG: tl.constexpr = 2147483647
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    inb = offs < L
    ids_row = ids_ptr + row * s_ids
    turn_row = turn_ptr + row * s_turn
    obs_row = obs_ptr + row * s_obs
    v_lo = tl.load(roff_ptr + row)
    v_hi = tl.load(roff_ptr + row + 1)
    tok0 = _ids32(tl.load(ids_row + offs, mask=inb, other=-1))
    pp = tl.arange(0, BLOCK_P)
    best_t = tl.full((), BIG, tl.int32)
    best_p = tl.full((), BIG, tl.int32)
    for v0 in range(v_lo, v_hi, BLOCK_P):
        # prefilter: BLOCK_P patterns' first tokens against the whole block, one "any" for all
        vv = v0 + pp
        vin = vv < v_hi
        p_lo = tl.load(voff_ptr + vv, mask=vin, other=0)
        n = tl.where(vin, tl.load(voff_ptr + vv + 1, mask=vin, other=0) - p_lo, 0)
        first = tl.load(pat_ptr + p_lo, mask=n > 0, other=-2)          # -2: no pattern (ids are >= -1)
        hit = tok0 == tl.sum(tl.where(pp == 0, first, 0), axis=0)
        for q in tl.static_range(1, BLOCK_P):
            hit = hit | (tok0 == tl.sum(tl.where(pp == q, first, 0), axis=0))
        if tl.max((hit & inb).to(tl.int32), axis=0) > 0:                # rare: check the survivors
            for i in range(0, BLOCK_P):
                f_i = tl.sum(tl.where(pp == i, first, 0), axis=0)
                cand = inb & (tok0 == f_i)
                if tl.max(cand.to(tl.int32), axis=0) > 0:
                    lo_i = tl.sum(tl.where(pp == i, p_lo, 0), axis=0)
                    n_i = tl.sum(tl.where(pp == i, n, 0), axis=0)
                    t, ok = _check_pattern(ids_row, turn_row, obs_row, pat_ptr, lo_i, n_i, offs, cand, L, SOURCE)
                    bt = tl.min(tl.where(ok, t, BIG), axis=0)
                    bp = tl.min(tl.where(ok & (t == bt), offs, BIG), axis=0)
                    better = (bt < best_t) | ((bt == best_t) & (bp < best_p))
                    best_t = tl.where(better, bt, best_t)
                    best_p = tl.where(better, bp, best_p)
    if best_t != BIG:
        tl.atomic_min(key_ptr + row, best_t.to(tl.int64) * L + best_p)          # the 64-bit key, once
    # countdown from NONE: the program that sees NONE - (n_blocks - 1) finishes last and
    # turns the key into (turn, pos), in place of the two counters
    left = tl.atomic_add(count_ptr + row, -1)
    last = tl.full((), NONE, tl.int64) - (n_blocks - 1)
    if left == last:
        k = tl.atomic_min(key_ptr + row, NONE)                      # reads the final minimum
        found = k != NONE
        tl.store(count_ptr + row, tl.where(found, k // L, -1))
        tl.store(key_ptr + row, tl.where(found, k % L, -1))


def k1_launch(L: int, block_l: int = 512, block_p: int = 8) -> dict:
    """Launch settings of ``_first_occurrence_kernel`` for rows of L tokens (the compile check,
    ``bench/kernel_resources.py``, builds every configuration this returns).  Four positions per
    thread: on sm_90 that needs about 48 registers, so 10 CTAs (40 warps) fit an SM; eight per
    thread need twice the registers and halve the CTAs, with the same bytes in flight."""
    block = min(block_l, max(16, triton.next_power_of_2(L)))
    return dict(BLOCK_L=block, BLOCK_P=max(2, block_p), num_warps=min(4, max(1, block // 128)))


def _first_occurrence_triton(token_ids, turn_id, is_obs, patterns: PackedPatterns, source: str,
                             block_l: int = 512, block_p: int = 8, out=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Launch K1; ``out`` optionally gives the two (B,) int64 output buffers (turn, pos)."""
    B, L = token_ids.shape
    dev = token_ids.device
    if out is None:
        both = torch.full((2, B), _NONE, dtype=torch.int64, device=dev)       # one fill for both counters
        out = (both[0], both[1])
    elif B and L:
        out[0].fill_(_NONE), out[1].fill_(_NONE)
    out_turn, out_pos = out
    if B == 0 or L == 0:
        out_turn.fill_(-1), out_pos.fill_(-1)
        return out_turn, out_pos
    if is_obs.dtype == torch.bool:
        is_obs = is_obs.view(torch.uint8)
    token_ids, turn_id, is_obs = (x if x.stride(-1) == 1 else x.contiguous() for x in (token_ids, turn_id, is_obs))
    ids, voff, roff = (x.contiguous() for x in (patterns.ids, patterns.offsets, patterns.row_offsets))
    if ids.numel() == 0:  # no pattern tokens at all: give the kernel a valid pointer
        ids = torch.zeros(1, dtype=torch.int32, device=dev)
    cfg = k1_launch(L, block_l, block_p)
    n_blocks = triton.cdiv(L, cfg["BLOCK_L"])
    _first_occurrence_kernel[(B, n_blocks)](
        token_ids, turn_id, is_obs, ids, voff, roff, out_pos, out_turn,
        L, n_blocks, token_ids.stride(0), turn_id.stride(0), is_obs.stride(0),
        SOURCE=_SOURCE_CODE[source], **cfg,
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
