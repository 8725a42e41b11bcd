"""K2: turn-level, group-normalised advantages from FOLR turn rewards (docs/algorithm.md §3, §5).

Two launches, so that the per-token pass is a pure stream:

1. ``_turn_table_kernel``: one program per ``BLOCK_R`` rows.  It loads the (R, k*, K, group)
   of all B rows in blocks of ``BLOCK_B`` (a group is "same group id": no host-side
   ``unique``, no device sync), finds each of its rows' group members with a (BLOCK_R,
   BLOCK_B) comparison, computes the group (or per-turn) statistics and writes the (B, T)
   table of per-(row, turn) advantages.  Its work is O(B^2 T) on O(B) inputs: small.
2. ``_token_adv_kernel``: a 2-D grid over (row, block of ``BLOCK_L`` tokens); each program
   reads ``turn_id`` and ``loss_mask``, gathers its row's table entry (L1/L2-resident) and
   writes the float32 advantage: 9 bytes per token, the copy floor's traffic.

Statistics are accumulated as deviations from the row's own value (a pivot), so a group
whose values are all equal gets sums of exactly zero and thus advantage 0, as the reference.

Modes (constexpr ``MODE``): 0 "tspo", 1 "grpo" (alpha = 0, gamma = 1, group norm), 2
"tspo_stage" (per group: "grpo" where the members' outcomes differ, exactly compared; "tspo"
with ``norm`` where they all coincide).  "tspo_placebo" is mode 0 on the k* that
:func:`tspo_kernels.reference.placebo_first_turn` draws (one home for the draw, so that every
backend moves the same bonuses; it is a few vectorised torch ops over the batch's rows).

Non-finite outcomes (docs/algorithm.md §5 "Non-finite inputs"): a member with a NaN or
infinite outcome is left out of its group's statistics and gets NaN on all of its turns; the
other members are computed as if it were absent.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from . import _checks, reference

__all__ = ["turn_advantages"]

_MODE_CODE = {"tspo": 0, "grpo": 1, "tspo_stage": 2}


@triton.jit
def _pow(base_log2, e):
    # base ** e for integer e >= 0 given log2(base); base = 0 gives 0 ** 0 = 1
    return tl.where(e == 0, 1.0, tl.exp2(e.to(tl.float32) * base_log2))


@triton.jit
def _returns(R, ks, K, k, alpha, log2_gamma):
    """G_k = R * gamma^(K-1-k) + alpha * gamma^(k*-k) [k <= k*, 0 <= k* < K]; 0 for k >= K."""
    has = k < K
    star = (ks >= 0) & (ks < K) & (k <= ks)
    g = R * _pow(log2_gamma, tl.where(has, K - 1 - k, 0))
    g += tl.where(star, alpha * _pow(log2_gamma, tl.where(star, ks - k, 0)), 0.0)
    return tl.where(has, g, 0.0)


@triton.jit
def _member_block(outcome_ptr, first_ptr, nturn_ptr, gid_ptr, start, B, g_r, BLOCK_B: tl.constexpr):
    """One block of candidate members j: (membership (BLOCK_R, BLOCK_B), R_j, R_j as float64, k*_j, K_j)."""
    j = start + tl.arange(0, BLOCK_B)
    inb = j < B
    K_j = tl.load(nturn_ptr + j, mask=inb, other=0).to(tl.int32)
    R_raw = tl.load(outcome_ptr + j, mask=inb, other=0)
    R_j = R_raw.to(tl.float32)
    fin_j = tl.abs(R_j) < float("inf")
    ks_j = tl.load(first_ptr + j, mask=inb, other=-1).to(tl.int32)
    g_j = tl.load(gid_ptr + j, mask=inb, other=0)
    mem = (g_j[None, :] == g_r[:, None]) & (inb & (K_j >= 1) & fin_j)[None, :]
    return mem, tl.where(fin_j, R_j, 0.0), R_raw.to(tl.float64), ks_j, K_j


@triton.jit
def _turn_table_kernel(outcome_ptr, first_ptr, nturn_ptr, gid_ptr, turn_adv_ptr,
                       B, T, alpha, log2_gamma, eps,
                       MODE: tl.constexpr, NORM_TURN: tl.constexpr, BLOCK_R: tl.constexpr,
                       BLOCK_B: tl.constexpr, BLOCK_T: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_in = r < B
    kk = tl.arange(0, BLOCK_T)
    g_r = tl.load(gid_ptr + r, mask=r_in, other=0)
    R_raw = tl.load(outcome_ptr + r, mask=r_in, other=0)
    R_r = R_raw.to(tl.float32)
    fin_r = tl.abs(R_r) < float("inf")
    R_r = tl.where(fin_r, R_r, 0.0)
    R64_r = R_raw.to(tl.float64)
    ks_r = tl.load(first_ptr + r, mask=r_in, other=-1).to(tl.int32)
    K_r = tl.load(nturn_ptr + r, mask=r_in, other=0).to(tl.int32)

    # which rows use outcome-only ("grpo") values: every row in mode 1; in mode 2 the rows
    # of groups whose members' outcomes differ (exact comparison, in float64)
    if MODE == 1:
        outc = r_in
    elif MODE == 2:
        diff = tl.zeros((BLOCK_R,), tl.int32)
        for start in range(0, B, BLOCK_B):
            mem, R_j, R64_j, ks_j, K_j = _member_block(outcome_ptr, first_ptr, nturn_ptr, gid_ptr, start, B, g_r,
                                                       BLOCK_B)
            ne = mem & (R64_j[None, :] != R64_r[:, None])
            diff = tl.maximum(diff, tl.max(ne.to(tl.int32), axis=1))
        outc = diff > 0
    else:
        outc = r_in & (r < 0)                                      # all False
    a_r = tl.where(outc, 0.0, alpha)                                 # "grpo": alpha 0, gamma 1
    lg_r = tl.where(outc, 0.0, log2_gamma)

    # trajectory values x_j = G_j[0] with row r's (alpha, gamma); pivot = row r's own value
    piv0 = _returns(R_r, ks_r, K_r, 0, a_r, lg_r)
    n0 = tl.zeros((BLOCK_R,), tl.float32)
    d0 = tl.zeros((BLOCK_R,), tl.float32)
    for start in range(0, B, BLOCK_B):
        mem, R_j, R64_j, ks_j, K_j = _member_block(outcome_ptr, first_ptr, nturn_ptr, gid_ptr, start, B, g_r,
                                                   BLOCK_B)
        x = _returns(R_j[None, :], ks_j[None, :], K_j[None, :], 0, a_r[:, None], lg_r[:, None])
        n0 += tl.sum(mem.to(tl.float32), axis=1)
        d0 += tl.sum(tl.where(mem, x - piv0[:, None], 0.0), axis=1)
    md0 = d0 / tl.maximum(n0, 1.0)
    ss0 = tl.zeros((BLOCK_R,), tl.float32)
    for start in range(0, B, BLOCK_B):
        mem, R_j, R64_j, ks_j, K_j = _member_block(outcome_ptr, first_ptr, nturn_ptr, gid_ptr, start, B, g_r,
                                                   BLOCK_B)
        x = _returns(R_j[None, :], ks_j[None, :], K_j[None, :], 0, a_r[:, None], lg_r[:, None])
        e = x - piv0[:, None] - md0[:, None]
        ss0 += tl.sum(tl.where(mem, e * e, 0.0), axis=1)
    few0 = n0 < 2.0
    sd0 = tl.where(few0, 1.0, tl.sqrt(ss0 / tl.maximum(n0 - 1.0, 1.0)))

    # group-normalised advantages of every turn: (G_r[k] - mu) = (G_r[k] - pivot) - mean deviation
    G_r = _returns(R_r[:, None], ks_r[:, None], K_r[:, None], kk[None, :], a_r[:, None], lg_r[:, None])
    num = tl.where(few0[:, None], G_r, (G_r - piv0[:, None]) - md0[:, None])
    adv = tl.where(sd0[:, None] == 0.0, 0.0, num / (sd0[:, None] + eps))

    if NORM_TURN:
        # per turn k: the members that have turn k; fallback to the group values under 2 members
        for k in range(0, T):
            piv_k = tl.sum(tl.where(kk[None, :] == k, G_r, 0.0), axis=1)
            nk = tl.zeros((BLOCK_R,), tl.float32)
            dk = tl.zeros((BLOCK_R,), tl.float32)
            for start in range(0, B, BLOCK_B):
                mem, R_j, R64_j, ks_j, K_j = _member_block(outcome_ptr, first_ptr, nturn_ptr, gid_ptr, start, B,
                                                           g_r, BLOCK_B)
                memk = mem & (K_j > k)[None, :]
                x = _returns(R_j[None, :], ks_j[None, :], K_j[None, :], k, a_r[:, None], lg_r[:, None])
                nk += tl.sum(memk.to(tl.float32), axis=1)
                dk += tl.sum(tl.where(memk, x - piv_k[:, None], 0.0), axis=1)
            mdk = dk / tl.maximum(nk, 1.0)
            ssk = tl.zeros((BLOCK_R,), tl.float32)
            for start in range(0, B, BLOCK_B):
                mem, R_j, R64_j, ks_j, K_j = _member_block(outcome_ptr, first_ptr, nturn_ptr, gid_ptr, start, B,
                                                           g_r, BLOCK_B)
                memk = mem & (K_j > k)[None, :]
                x = _returns(R_j[None, :], ks_j[None, :], K_j[None, :], k, a_r[:, None], lg_r[:, None])
                e = x - piv_k[:, None] - mdk[:, None]
                ssk += tl.sum(tl.where(memk, e * e, 0.0), axis=1)
            sdk = tl.sqrt(ssk / tl.maximum(nk - 1.0, 1.0))
            adv_k = tl.where(sdk == 0.0, 0.0, -mdk / (sdk + eps))   # (G_r[k] - pivot_k) = 0
            use_k = (nk >= 2.0) & (outc == 0)                           # "grpo" rows: group norm
            adv = tl.where((kk[None, :] == k) & use_k[:, None], adv_k[:, None], adv)

    adv = tl.where(kk[None, :] < K_r[:, None], adv, 0.0)
    adv = tl.where(fin_r[:, None] | (kk[None, :] >= K_r[:, None]), adv, float("nan"))
    out = turn_adv_ptr + r.to(tl.int64)[:, None] * T + kk[None, :]
    tl.store(out, adv, mask=r_in[:, None] & (kk[None, :] < T))


@triton.jit
def _token_adv_kernel(turn_ptr, mask_ptr, turn_adv_ptr, tok_adv_ptr, L, T, s_turn, s_mask, s_tok,
                      BLOCK_L: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    inb = offs < L
    t = tl.load(turn_ptr + b * s_turn + offs, mask=inb, other=-1).to(tl.int32)
    m = tl.load(mask_ptr + b * s_mask + offs, mask=inb, other=0) != 0
    hit = m & (t >= 0) & (t < T)
    val = tl.load(turn_adv_ptr + b * T + t, mask=hit, other=0.0)
    tl.store(tok_adv_ptr + b * s_tok + offs, tl.where(hit, val, 0.0), mask=inb)


def _turn_advantages_triton(outcome, first_turn, num_turns, group_ids, turn_id, loss_mask, *, alpha, gamma, norm,
                            eps, T, mode="tspo", block_b=1024, block_l=1024, block_r=4,
                            out=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Launch K2's two kernels; ``out`` optionally gives the (B, L) and (B, T) float32 output buffers.

    ``mode`` "grpo" ignores alpha, gamma and norm; the caller has checked the inputs."""
    B, L = turn_id.shape
    dev = outcome.device
    if out is None:
        out = (torch.empty(B, L, dtype=torch.float32, device=dev), torch.empty(B, T, dtype=torch.float32, device=dev))
    token_adv, turn_adv = out
    if B == 0:
        return token_adv, turn_adv
    if loss_mask.dtype == torch.bool:
        loss_mask = loss_mask.view(torch.uint8)
    turn_id, loss_mask = (x if x.stride(-1) == 1 else x.contiguous() for x in (turn_id, loss_mask))
    outcome, first_turn, num_turns, group_ids = (x.contiguous() for x in (outcome, first_turn, num_turns, group_ids))
    if mode == "grpo":
        alpha, gamma, norm = 0.0, 1.0, "group"
    log2_gamma = math.log2(gamma) if gamma > 0 else float("-inf")
    block_r = max(2, min(block_r, triton.next_power_of_2(B)))
    _turn_table_kernel[(triton.cdiv(B, block_r),)](
        outcome, first_turn, num_turns, group_ids, turn_adv, B, T, float(alpha), log2_gamma, float(eps),
        MODE=_MODE_CODE[mode], NORM_TURN=(norm == "turn"), BLOCK_R=block_r,
        BLOCK_B=min(block_b, max(16, triton.next_power_of_2(B))), BLOCK_T=max(2, triton.next_power_of_2(T)),
    )
    if L > 0:
        block = min(block_l, max(16, triton.next_power_of_2(L)))
        _token_adv_kernel[(B, triton.cdiv(L, block))](
            turn_id, loss_mask, turn_adv, token_adv, L, T, turn_id.stride(0), loss_mask.stride(0),
            token_adv.stride(0), BLOCK_L=block, num_warps=4)
    return token_adv, turn_adv


def turn_advantages(outcome: torch.Tensor, first_turn: torch.Tensor, num_turns: torch.Tensor,
                    group_ids: torch.Tensor, turn_id: torch.Tensor, loss_mask: torch.Tensor, *,
                    alpha: float = 0.5, gamma: float = 1.0, mode: str = "tspo", norm: str = "group",
                    eps: float = 1e-6, max_turns: Optional[int] = None, validate: bool = True,
                    backend: str = "auto", seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Turn-level, group-normalised TSPO advantages (K2, docs/algorithm.md §3).

    outcome (B,) float (R_i), first_turn (B,) int (k*_i, -1 if none), num_turns (B,) int >= 0
    (K_i), group_ids (B,) int (prompt uid), turn_id (B, L) int (-1 on prompt/padding),
    loss_mask (B, L) bool.  Turn rewards r[i,k] = alpha [k = k*_i] + R_i [k = K_i - 1],
    returns G with discount gamma, normalised per group (``norm="group"``: trajectory
    returns G[i, 0]; ``norm="turn"``: per turn, group fallback under 2 members).
    ``mode="grpo"``: outcome-only GRPO advantages on every turn (alpha and norm ignored).
    ``mode="tspo_stage"``: per group, the "grpo" advantages where its members' outcomes are
    not all (exactly) equal, the "tspo" advantages with ``norm`` where they all coincide.
    ``mode="tspo_placebo"`` (a control for experiments): "tspo" after each group's FOLR bonuses
    are moved to members and turns drawn at random (as many as the group has k*), seeded by
    ``seed`` (:func:`tspo_kernels.reference.placebo_first_turn`).
    A group whose values all coincide gets advantage 0; a group of one uses mean 0, std 1.

    Non-finite outcomes: a row with a NaN/inf R_i gets NaN on all its turns (so its
    loss-masked tokens, and a loss over them, are NaN) and is left out of its group's
    statistics; the other rows of the group are as if it were absent.  Identical on every
    backend.

    ``max_turns``: width T of ``turn_adv``; defaults to max(num_turns); turns >= T get 0.
    ``validate`` (default True): reject negative ``num_turns`` with a ValueError naming the
    row; this reads ``num_turns`` back from the device (one sync on CUDA, shared with the
    ``max_turns=None`` read-back).  ``validate=False`` skips the read when ``max_turns`` is
    given; a negative K_i then counts as no turns (on every backend but "reference", which
    always validates).

    Returns ``(token_adv (B, L) float32, turn_adv (B, T) float32)``; tokens outside the loss
    mask get 0.  Matches ``tspo_kernels.reference.turn_advantages`` to float32 rounding.
    """
    _checks.turn_advantages_args(outcome, first_turn, num_turns, group_ids, turn_id, loss_mask, mode, norm, gamma,
                                 eps, alpha)
    if not _checks.use_triton(backend, outcome.device):
        if backend != "reference" and not validate and max_turns is not None:
            num_turns = num_turns.clamp(min=0)      # as the kernel: a negative K_i is no turns
        return reference.turn_advantages(outcome, first_turn, num_turns, group_ids, turn_id, loss_mask, alpha=alpha,
                                         gamma=gamma, mode=mode, norm=norm, eps=eps, max_turns=max_turns, seed=seed)
    if validate or max_turns is None:
        k_max = _checks.num_turns_values(num_turns)
        if max_turns is None:
            max_turns = max(k_max, 1)
    if max_turns < 1:
        raise ValueError(f"max_turns must be >= 1, got {max_turns}")
    if mode == "tspo_placebo":
        first_turn = reference.placebo_first_turn(outcome, first_turn, num_turns, group_ids, seed)
        mode = "tspo"
    return _turn_advantages_triton(outcome, first_turn, num_turns, group_ids, turn_id, loss_mask, alpha=alpha,
                                   gamma=gamma, norm=norm, eps=eps, T=int(max_turns), mode=mode)
