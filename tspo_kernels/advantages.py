"""K2: turn-level, group-normalised advantages from FOLR turn rewards (docs/algorithm.md §3).

One Triton program per row.  It computes its own turn returns G[b, :], the statistics of
its group by scanning all rows' (R, k*, K, group) in blocks of ``BLOCK_B`` (a group is "same
group id", so no host-side ``unique`` and no device sync is needed), then streams the row's
tokens once, writing turn k's advantage on the loss-masked tokens of turn k.

Statistics are accumulated as deviations from the row's own value (a pivot), so a group
whose values are all equal gets a sum of exactly zero and thus advantage 0, as the reference.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from . import _checks, reference

__all__ = ["turn_advantages"]


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
def _turn_adv_kernel(outcome_ptr, first_ptr, nturn_ptr, gid_ptr, turn_ptr, mask_ptr, tok_adv_ptr, turn_adv_ptr,
                     B, L, T, s_turn, s_mask, s_tok, alpha, log2_gamma, eps,
                     NORM_TURN: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_T: tl.constexpr,
                     BLOCK_L: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    kk = tl.arange(0, BLOCK_T)
    my_g = tl.load(gid_ptr + b)
    R_b = tl.load(outcome_ptr + b).to(tl.float32)
    ks_b = tl.load(first_ptr + b).to(tl.int32)
    K_b = tl.load(nturn_ptr + b).to(tl.int32)
    G_b = _returns(R_b, ks_b, K_b, kk, alpha, log2_gamma)           # (BLOCK_T,)
    piv0 = tl.sum(tl.where(kk == 0, G_b, 0.0), axis=0)              # own G[b, 0]

    # pass 1: counts and mean deviations from the pivot
    n0 = tl.zeros((), tl.float32)
    d0 = tl.zeros((), tl.float32)
    nk = tl.zeros((BLOCK_T,), tl.float32)
    dk = tl.zeros((BLOCK_T,), tl.float32)
    for start in range(0, B, BLOCK_B):
        j = start + tl.arange(0, BLOCK_B)
        inb = j < B
        Kj = tl.load(nturn_ptr + j, mask=inb, other=0).to(tl.int32)
        mem = inb & (tl.load(gid_ptr + j, mask=inb, other=0) == my_g) & (Kj >= 1)
        Rj = tl.load(outcome_ptr + j, mask=inb, other=0).to(tl.float32)
        ksj = tl.load(first_ptr + j, mask=inb, other=-1).to(tl.int32)
        G0 = _returns(Rj, ksj, Kj, 0, alpha, log2_gamma)
        n0 += tl.sum(mem.to(tl.float32), axis=0)
        d0 += tl.sum(tl.where(mem, G0 - piv0, 0.0), axis=0)
        if NORM_TURN:
            Gjk = _returns(Rj[:, None], ksj[:, None], Kj[:, None], kk[None, :], alpha, log2_gamma)
            memk = mem[:, None] & (kk[None, :] < Kj[:, None])
            nk += tl.sum(memk.to(tl.float32), axis=0)
            dk += tl.sum(tl.where(memk, Gjk - G_b[None, :], 0.0), axis=0)
    md0 = d0 / tl.maximum(n0, 1.0)
    mdk = dk / tl.maximum(nk, 1.0)

    # pass 2: sums of squared deviations from the mean
    ss0 = tl.zeros((), tl.float32)
    ssk = tl.zeros((BLOCK_T,), tl.float32)
    for start in range(0, B, BLOCK_B):
        j = start + tl.arange(0, BLOCK_B)
        inb = j < B
        Kj = tl.load(nturn_ptr + j, mask=inb, other=0).to(tl.int32)
        mem = inb & (tl.load(gid_ptr + j, mask=inb, other=0) == my_g) & (Kj >= 1)
        Rj = tl.load(outcome_ptr + j, mask=inb, other=0).to(tl.float32)
        ksj = tl.load(first_ptr + j, mask=inb, other=-1).to(tl.int32)
        G0 = _returns(Rj, ksj, Kj, 0, alpha, log2_gamma)
        e0 = G0 - piv0 - md0
        ss0 += tl.sum(tl.where(mem, e0 * e0, 0.0), axis=0)
        if NORM_TURN:
            Gjk = _returns(Rj[:, None], ksj[:, None], Kj[:, None], kk[None, :], alpha, log2_gamma)
            memk = mem[:, None] & (kk[None, :] < Kj[:, None])
            ek = Gjk - G_b[None, :] - mdk[None, :]
            ssk += tl.sum(tl.where(memk, ek * ek, 0.0), axis=0)

    # group statistics: (G - mu) = (G - pivot) - mean deviation; under 2 members mu = 0, sd = 1
    few0 = n0 < 2.0
    sd0 = tl.where(few0, 1.0, tl.sqrt(ss0 / tl.maximum(n0 - 1.0, 1.0)))
    num = tl.where(few0, G_b, (G_b - piv0) - md0)
    sd = sd0 + tl.zeros((BLOCK_T,), tl.float32)
    if NORM_TURN:
        use_k = nk >= 2.0
        sdk = tl.sqrt(ssk / tl.maximum(nk - 1.0, 1.0))
        num = tl.where(use_k, -mdk, num)                 # (G_b[k] - pivot_k) = 0 for pivot_k = G_b[k]
        sd = tl.where(use_k, sdk, sd)
    adv = tl.where(sd == 0.0, 0.0, num / (sd + eps))
    adv = tl.where(kk < K_b, adv, 0.0)
    tl.store(turn_adv_ptr + b * T + kk, adv, mask=kk < T)

    # stream the row's tokens: turn k's advantage on its loss-masked tokens
    for start in range(0, L, BLOCK_L):
        offs = start + tl.arange(0, BLOCK_L)
        inb = offs < L
        t = tl.load(turn_ptr + b * s_turn + offs, mask=inb, other=-1).to(tl.int32)
        m = tl.load(mask_ptr + b * s_mask + offs, mask=inb, other=0) != 0
        hit = (t[:, None] == kk[None, :]) & (kk[None, :] < T)
        val = tl.sum(tl.where(hit, adv[None, :], 0.0), axis=1)
        tl.store(tok_adv_ptr + b * s_tok + offs, tl.where(m, val, 0.0), mask=inb)


def _turn_advantages_triton(outcome, first_turn, num_turns, group_ids, turn_id, loss_mask, *, alpha, gamma, norm,
                            eps, T, block_b=1024, block_l=512, out=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Launch K2; ``out`` optionally gives the (B, L) and (B, T) float32 output buffers."""
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
    log2_gamma = math.log2(gamma) if gamma > 0 else float("-inf")
    _turn_adv_kernel[(B,)](
        outcome, first_turn, num_turns, group_ids, turn_id, loss_mask, token_adv, turn_adv,
        B, L, T, turn_id.stride(0), loss_mask.stride(0), token_adv.stride(0),
        float(alpha), log2_gamma, float(eps),
        NORM_TURN=(norm == "turn"),
        BLOCK_B=min(block_b, max(16, triton.next_power_of_2(B))),
        BLOCK_T=max(2, triton.next_power_of_2(T)),
        BLOCK_L=min(block_l, max(16, triton.next_power_of_2(max(L, 1)))),
    )
    return token_adv, turn_adv


def turn_advantages(outcome: torch.Tensor, first_turn: torch.Tensor, num_turns: torch.Tensor,
                    group_ids: torch.Tensor, turn_id: torch.Tensor, loss_mask: torch.Tensor, *,
                    alpha: float = 0.5, gamma: float = 1.0, mode: str = "tspo", norm: str = "group",
                    eps: float = 1e-6, max_turns: Optional[int] = None,
                    backend: str = "auto") -> Tuple[torch.Tensor, torch.Tensor]:
    """Turn-level, group-normalised TSPO advantages (K2).

    outcome (B,) float (R_i), first_turn (B,) int (k*_i, -1 if none), num_turns (B,) int
    (K_i), group_ids (B,) int (prompt uid), turn_id (B, L) int (-1 on prompt/padding),
    loss_mask (B, L) bool.  Turn rewards r[i,k] = alpha [k = k*_i] + R_i [k = K_i - 1],
    returns G with discount gamma, normalised per group (``norm="group"``: trajectory
    returns G[i, 0]; ``norm="turn"``: per turn, group fallback under 2 members).
    ``mode="grpo"``: outcome-only GRPO advantages on every turn (alpha and norm ignored).
    A group whose values all coincide gets advantage 0; a group of one uses mean 0, std 1.

    ``max_turns``: width T of ``turn_adv``; defaults to max(num_turns), which reads it back
    to the host (a device sync).  Pass it (e.g. the rollout's turn limit + 1) to avoid the
    sync; turns >= T then get advantage 0.

    Returns ``(token_adv (B, L) float32, turn_adv (B, T) float32)``; tokens outside the loss
    mask get 0.  Matches ``tspo_kernels.reference.turn_advantages`` to float32 rounding.
    """
    _checks.turn_advantages_args(outcome, first_turn, num_turns, group_ids, turn_id, loss_mask, mode, norm, gamma, eps)
    if not _checks.use_triton(backend, outcome.device):
        return reference.turn_advantages(outcome, first_turn, num_turns, group_ids, turn_id, loss_mask, alpha=alpha,
                                         gamma=gamma, mode=mode, norm=norm, eps=eps, max_turns=max_turns)
    if max_turns is None:
        max_turns = max(int(num_turns.max()), 1) if outcome.numel() else 1
    if max_turns < 1:
        raise ValueError(f"max_turns must be >= 1, got {max_turns}")
    if mode == "grpo":
        alpha, gamma, norm = 0.0, 1.0, "group"
    return _turn_advantages_triton(outcome, first_turn, num_turns, group_ids, turn_id, loss_mask, alpha=alpha,
                                   gamma=gamma, norm=norm, eps=eps, T=int(max_turns))
