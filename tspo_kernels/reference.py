"""Plain-PyTorch references of every kernel: the math of docs/algorithm.md §2-§5 written for clarity.

They are the ground truth of the tests, the CPU path of the trainer, and the documentation
of the formulas.  Each has the same signature as the public kernel function.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch

from . import _checks
from .patterns import PackedPatterns

__all__ = ["first_occurrence", "turn_advantages", "turn_returns"]


# =========================================================================== K1
def segment_codes(turn_id: torch.Tensor, is_obs: torch.Tensor) -> torch.Tensor:
    """Per-token segment code: ``2 * turn + is_obs`` on turn tokens, -1 on prompt/padding.

    A segment is a maximal run of one code: the action or the observation of one turn.
    """
    turn = turn_id.long()
    return torch.where(turn >= 0, 2 * turn + is_obs.long(), torch.full_like(turn, -1))


def selected_tokens(turn_id: torch.Tensor, is_obs: torch.Tensor, source: str) -> torch.Tensor:
    """Tokens where a match may start: turn tokens of the selected segment kind."""
    sel = turn_id.long() >= 0
    if source == "observation":
        sel = sel & is_obs.bool()
    elif source == "action":
        sel = sel & ~is_obs.bool()
    return sel


def first_occurrence(token_ids: torch.Tensor, turn_id: torch.Tensor, is_obs: torch.Tensor,
                     patterns: PackedPatterns, source: str = "observation") -> Tuple[torch.Tensor, torch.Tensor]:
    """First turn whose selected segment contains one of the row's patterns (K1).

    token_ids (B, L) int, turn_id (B, L) int (-1 = prompt/padding), is_obs (B, L) bool,
    patterns: :class:`PackedPatterns` with B rows.  A match of pattern p at position s
    needs ``token_ids[b, s:s+len(p)] == p`` with all those tokens in ONE segment
    (same turn and same kind) and that segment of the kind ``source`` selects
    ("observation", "action" or "any").  Empty patterns never match.

    Returns ``(turn, pos)``, int64 (B,): the smallest matching turn and, within it, the
    smallest start position; -1 for both where nothing matches.
    """
    B, L = _checks.first_occurrence_args(token_ids, turn_id, is_obs, patterns, source)
    dev = token_ids.device
    out_turn = torch.full((B,), -1, dtype=torch.int64, device=dev)
    out_pos = torch.full((B,), -1, dtype=torch.int64, device=dev)
    seg = segment_codes(turn_id, is_obs)
    sel = selected_tokens(turn_id, is_obs, source)
    ids = token_ids.long()
    for b in range(B):
        best = None
        for pattern in patterns.row(b):
            m = len(pattern)
            if m == 0 or m > L:
                continue
            p = torch.tensor(pattern, dtype=torch.int64, device=dev)
            win = ids[b].unfold(0, m, 1)            # (L - m + 1, m)
            seg_win = seg[b].unfold(0, m, 1)
            ok = (win == p).all(1) & (seg_win == seg_win[:, :1]).all(1) & sel[b, : L - m + 1]
            starts = ok.nonzero().flatten()
            if starts.numel():
                keys = turn_id[b, starts].long() * L + starts
                k = int(keys.min())
                best = k if best is None else min(best, k)
        if best is not None:
            out_turn[b], out_pos[b] = best // L, best % L
    return out_turn, out_pos


# =========================================================================== K2
def turn_returns(outcome: torch.Tensor, first_turn: torch.Tensor, num_turns: torch.Tensor, max_turns: int,
                 *, alpha: float, gamma: float) -> torch.Tensor:
    """G[i, k] = sum_{j >= k} gamma^(j-k) r[i, j] with r[i, j] = alpha*[j = k*_i] + R_i*[j = K_i - 1].

    Returns (B, max_turns) float64, 0 for k >= K_i.  A first turn outside [0, K_i) counts as none.
    """
    R = outcome.double()[:, None]
    K = num_turns.long()[:, None]
    ks = first_turn.long()[:, None]
    k = torch.arange(max_turns, device=outcome.device)[None, :]
    g = torch.tensor(float(gamma), dtype=torch.float64, device=outcome.device)
    has = k < K
    star = (ks >= 0) & (ks < K) & (k <= ks)
    G = R * g.pow((K - 1 - k).clamp(min=0).double()) + alpha * g.pow((ks - k).clamp(min=0).double()) * star
    return torch.where(has, G, torch.zeros_like(G))


_M64 = (1 << 64) - 1


def _i64(c: int) -> int:
    """A 64-bit constant as the signed value torch's int64 holds."""
    return c - (1 << 64) if c >= 1 << 63 else c


def _shr(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 values (torch's ``>>`` is arithmetic)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def mix64(*parts: torch.Tensor) -> torch.Tensor:
    """A counter-based 64-bit hash of int64 tensors (SplitMix64's finaliser, chained); the same
    bits on every device and in every order of evaluation."""
    z = torch.zeros_like(parts[0], dtype=torch.int64)
    for p in parts:
        z = z ^ p.to(torch.int64)
        z = z + _i64(0x9E3779B97F4A7C15)
        z = (z ^ _shr(z, 30)) * _i64(0xBF58476D1CE4E5B9)
        z = (z ^ _shr(z, 27)) * _i64(0x94D049BB133111EB)
        z = z ^ _shr(z, 31)
    return z


def _uniform(z: torch.Tensor) -> torch.Tensor:
    """float64 in [0, 1) from the top 53 bits of a hash."""
    return _shr(z, 11).double() / float(1 << 53)


def placebo_first_turn(outcome: torch.Tensor, first_turn: torch.Tensor, num_turns: torch.Tensor,
                       group_ids: torch.Tensor, seed: int) -> torch.Tensor:
    """The placebo's k* (docs/algorithm.md §3, ``mode="tspo_placebo"``): in each group, as many
    members as have a first-occurrence turn (0 <= k*_i < K_i) get one, but the members are drawn
    uniformly without replacement among the group's members (rows with K_i >= 1 and a finite
    outcome) and each gets a turn drawn uniformly from its own [0, K_i); every other row gets -1.

    The draws are a hash of (``seed``, group id, row index), so they depend on the seed (a run's
    seed mixed with its step), the group and the batch's row order only: the same on every device
    and backend.  Returns (B,) int64.
    """
    B = outcome.shape[0]
    dev = outcome.device
    K = num_turns.long()
    member = (K >= 1) & torch.isfinite(outcome)
    hit = member & (first_turn.long() >= 0) & (first_turn.long() < K)
    out = torch.full((B,), -1, dtype=torch.int64, device=dev)
    if B == 0:
        return out
    rows = torch.arange(B, device=dev)
    s = torch.full((B,), int(seed) & _M64 if seed >= 0 else int(seed), dtype=torch.int64, device=dev)
    g = group_ids.long()
    key = mix64(s, g, rows)                                # order of the members within their group
    turn_u = _uniform(mix64(s, g, rows, torch.ones_like(rows)))
    _, grp = torch.unique(g, return_inverse=True)
    n_hits = torch.zeros(int(grp.max()) + 1, dtype=torch.int64, device=dev).index_add_(0, grp, hit.long())
    # rank of each member inside its group by key: sort by key, then stably by group
    order = torch.argsort(key)
    order = order[torch.argsort(grp[order], stable=True)]
    sorted_grp, sorted_member = grp[order], member[order].long()
    before = torch.cumsum(sorted_member, 0) - sorted_member          # members earlier in the sorted list
    start = torch.searchsorted(sorted_grp, sorted_grp)               # where each row's group begins
    rank = torch.empty_like(before)
    rank[order] = before - before[start]
    chosen = member & (rank < n_hits[grp])
    turn = torch.minimum((turn_u * K.clamp(min=1).double()).long(), (K - 1).clamp(min=0))
    return torch.where(chosen, turn, out)


def _stats(x: torch.Tensor) -> Tuple[float, float]:
    """(mean, unbiased std) of a group's values; (0, 1) under 2 values; std exactly 0 if all equal."""
    if x.numel() < 2:
        return 0.0, 1.0
    if bool((x == x[0]).all()):
        return float(x[0]), 0.0
    return float(x.mean()), float(x.std(unbiased=True))


def turn_advantages(outcome: torch.Tensor, first_turn: torch.Tensor, num_turns: torch.Tensor,
                    group_ids: torch.Tensor, turn_id: torch.Tensor, loss_mask: torch.Tensor, *,
                    alpha: float = 0.5, gamma: float = 1.0, mode: str = "tspo", norm: str = "group",
                    eps: float = 1e-6, max_turns: Optional[int] = None, seed: int = 0
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Turn-level, group-normalised advantages (K2, docs/algorithm.md §3).

    outcome (B,) float: R_i; first_turn (B,) int: k*_i or -1; num_turns (B,) int >= 0: K_i;
    group_ids (B,) int: prompt uid per row; turn_id (B, L) int (-1 = not a turn token);
    loss_mask (B, L) bool.  Rows with K_i = 0 take no part in the statistics.

    Modes: ``"tspo"``: returns G[i, k] of the FOLR turn rewards, normalised by ``norm``;
    ``"grpo"``: Search-R1's GRPO (alpha = 0, gamma = 1, group normalisation: the outcome
    advantage on every turn); ``"tspo_stage"``: per group, ``"grpo"`` where the outcomes R of
    its members (rows with K_i >= 1 and a finite outcome) are not all exactly equal, ``"tspo"``
    with ``norm`` where they all coincide (a group of one counts as all equal);
    ``"tspo_placebo"``: ``"tspo"`` on the k* of :func:`placebo_first_turn` (``seed``): each group
    gets as many FOLR bonuses as it has first-occurrence turns, on random members and turns.

    Statistics: ``norm="group"``: mean/unbiased std of {G[i, 0]} over the group;
    ``norm="turn"``: over the members that have turn k, falling back to the group's when
    fewer than 2 have it.  Under 2 values: mean 0, std 1.  A value set whose std is exactly 0
    (every value equal) gives advantage 0: there is no contrast inside the group.

    Non-finite outcomes: a row whose R_i is NaN or +-inf gets NaN on every one of its turns
    (and so on its loss-masked tokens) and takes no part in its group's statistics, which
    the other members compute as if it were absent: the NaN stays in its row.
    Negative ``num_turns``: ValueError naming the row.

    Returns ``(token_adv (B, L) float32, turn_adv (B, T) float32)``, T = ``max_turns`` or
    max(num_turns); turn k's advantage is written on the loss-masked tokens of turn k, every
    other token (and turns >= T) gets 0.
    """
    B, L = _checks.turn_advantages_args(outcome, first_turn, num_turns, group_ids, turn_id, loss_mask,
                                        mode, norm, gamma, eps, alpha)
    K_max = _checks.num_turns_values(num_turns)
    dev = outcome.device
    T = int(max_turns) if max_turns is not None else max(K_max, 1)
    if T < 1:
        raise ValueError(f"max_turns must be >= 1, got {max_turns}")
    if mode == "tspo_placebo":
        first_turn, mode = placebo_first_turn(outcome, first_turn, num_turns, group_ids, seed), "tspo"
    finite = torch.isfinite(outcome)
    R = torch.where(finite, outcome, torch.zeros_like(outcome))
    G_turn = turn_returns(R, first_turn, num_turns, T, alpha=alpha, gamma=gamma)       # "tspo" returns
    G_out = turn_returns(R, first_turn, num_turns, T, alpha=0.0, gamma=1.0)            # "grpo": R_i on every turn
    K = num_turns.long()
    A = torch.zeros(B, T, dtype=torch.float64, device=dev)
    for g in torch.unique(group_ids):
        rows = ((group_ids == g) & (K >= 1) & finite).nonzero().flatten()
        if rows.numel() == 0:
            continue
        outcomes = outcome[rows].double()
        mixed = bool((outcomes != outcomes[0]).any())
        use_grpo = mode == "grpo" or (mode == "tspo_stage" and mixed)
        G, nrm = (G_out, "group") if use_grpo else (G_turn, norm)
        mu0, sd0 = _stats(G[rows, 0])
        for k in range(T):
            rk = rows[K[rows] > k]
            if rk.numel() == 0:
                continue
            mu, sd = _stats(G[rk, k]) if (nrm == "turn" and rk.numel() >= 2) else (mu0, sd0)
            A[rk, k] = 0.0 if sd == 0.0 else (G[rk, k] - mu) / (sd + eps)
    k = torch.arange(T, device=dev)[None, :]
    A = torch.where((~finite)[:, None] & (k < K[:, None]), torch.full_like(A, float("nan")), A)
    t = turn_id.long()
    inside = loss_mask.bool() & (t >= 0) & (t < T)
    token_adv = torch.where(inside, A.gather(1, t.clamp(0, T - 1)), torch.zeros((), dtype=A.dtype, device=dev))
    return token_adv.float(), A.float()


# =========================================================================== K3
# Fused LM-head + masked policy-gradient loss (docs/algorithm.md §4, §5 K3): the plain version.  It
# materialises the (N, V) logits in the dtype it is given (the tests pass float64 copies) and
# lets autograd differentiate it; ``tspo_kernels.pg_loss`` must agree with it.


class _PGLossFields(NamedTuple):
    loss: torch.Tensor
    logp: torch.Tensor
    entropy: torch.Tensor
    kl: torch.Tensor
    clip_frac: torch.Tensor


class PGLossOutput(_PGLossFields):
    """Result of ``fused_linear_pg_loss`` / ``pg_loss_reference``: a 5-tuple

    loss       scalar: sum over loss-masked tokens of the per-token objective / normalizer
    logp       (N,) log pi(target) of every token (masked or not)
    entropy    (N,) entropy of the (temperature-scaled) distribution of every token
    kl         (N,) k3 KL to the reference on loss-masked tokens; 0 elsewhere and when
               ``ref_logp`` is None
    clip_frac  scalar: fraction of loss-masked tokens whose ratio gradient is clipped away
               (PPO clip or dual clip); 0 when no token is masked

    and one attribute outside the tuple (so that ``loss, logp, entropy, kl, clip_frac = out``
    keeps working): ``filter_stats``, the gradient-filtered path's statistics
    (``tspo_kernels.pg_loss.FilterStats``) when asked for, else None.
    """

    filter_stats = None


def _k3_log_softmax(hidden, weight, bias, temperature):
    logits = hidden @ weight.t()
    if bias is not None:
        logits = logits + bias
    return torch.log_softmax(logits / temperature, dim=-1)


def logprobs_reference(hidden, weight, targets, *, bias=None, temperature=1.0, return_entropy=False):
    """log pi(targets) (N,) (and entropy (N,)) from materialised logits, in hidden's dtype."""
    logsm = _k3_log_softmax(hidden, weight, bias, temperature)
    logp = logsm.gather(1, targets.long()[:, None])[:, 0]
    if not return_entropy:
        return logp
    return logp, -(logsm.exp() * logsm).sum(-1)


def pg_loss_reference(hidden, weight, targets, old_logp, advantages, loss_mask, *, bias=None,
                      ref_logp=None, rollout_logp=None, eps_low=0.2, eps_high=0.2, dual_clip=None,
                      beta=0.0, kl_clamp=10.0, entropy_coef=0.0, tis_cap=None, temperature=1.0,
                      normalizer=None, weights=None) -> PGLossOutput:
    """docs/algorithm.md §4 loss, differentiable by autograd; computes in hidden's dtype.

    hidden (N, H), weight (V, H), bias (V,) or None, targets (N,) int; old_logp, advantages,
    ref_logp, rollout_logp, weights (N,) float (old_logp None: on-policy, pi_old = pi detached);
    loss_mask (N,) (nonzero = in the loss).
    loss = sum over masked tokens of weights * objective / normalizer (weights default to 1).

    Non-finite inputs (docs/algorithm.md §5): tokens outside the mask contribute nothing, to the
    loss or to any gradient, whatever their inputs and hidden rows hold (the loss is computed
    from hidden rows zeroed there, and their per-token inputs replaced by 0); a NaN/inf in an
    input that enters a masked token's objective makes that token's objective NaN and its
    gradient NaN (so the loss and the gradients are NaN).  logp / entropy are reported for
    every token from the hidden states as given.
    """
    dt = hidden.dtype
    mask = loss_mask != 0
    zero = torch.zeros((), dtype=dt, device=hidden.device)
    with torch.no_grad():
        logp_all, ent_all = logprobs_reference(hidden, weight, targets, bias=bias, temperature=temperature,
                                               return_entropy=True)
    h_in = torch.where(mask[:, None], hidden, zero)     # masked-out rows never reach the loss
    logp, ent = logprobs_reference(h_in, weight, targets, bias=bias, temperature=temperature,
                                   return_entropy=True)
    clean = lambda x: None if x is None else torch.where(mask, x.to(dt), zero)
    A, ref_logp, rollout_logp, weights = clean(advantages), clean(ref_logp), clean(rollout_logp), clean(weights)
    old_logp = logp.detach() if old_logp is None else torch.where(mask, old_logp.to(dt), logp.detach())
    fin = torch.isfinite(logp) & torch.isfinite(ent) & torch.isfinite(A) & torch.isfinite(old_logp)
    rho = torch.exp(logp - old_logp)
    pg_plain = -rho * A
    pg_clip = -torch.clamp(rho, 1.0 - eps_low, 1.0 + eps_high) * A
    clipped = pg_clip > pg_plain
    pg = torch.maximum(pg_plain, pg_clip)
    if dual_clip is not None:
        cap = -dual_clip * A
        dual = (A < 0) & (pg > cap)
        pg = torch.where(dual, cap, pg)
        clipped = clipped | dual
    if tis_cap is not None:
        fin = fin & torch.isfinite(rollout_logp)
        pg = pg * torch.clamp(torch.exp(old_logp - rollout_logp), max=tis_cap)
    total = pg
    kl = torch.zeros_like(logp)
    if ref_logp is not None:
        d = ref_logp - logp
        kl = torch.clamp(torch.exp(d) - d - 1.0, max=kl_clamp)
        if beta != 0.0:
            fin = fin & torch.isfinite(ref_logp)
            total = total + beta * kl
    if entropy_coef != 0.0:
        total = total - entropy_coef * ent
    if weights is not None:
        fin = fin & torch.isfinite(weights)
        total = total * weights
    bad = mask & ~fin
    # a non-finite input: the objective is NaN, and so is its derivative (NaN * logp)
    nan_or_zero = torch.where(bad, torch.full((), float("nan"), dtype=dt, device=hidden.device), zero)
    total = total + logp * nan_or_zero
    count = mask.sum().to(dt)
    norm = count.clamp(min=1.0) if normalizer is None else torch.as_tensor(normalizer, dtype=dt,
                                                                          device=hidden.device)
    loss = torch.where(mask, total, zero).sum() / norm
    clip_frac = (clipped & mask & ~bad).sum().to(dt) / count.clamp(min=1.0)
    return PGLossOutput(loss, logp_all, ent_all, torch.where(mask, kl, zero).detach(), clip_frac)


__all__ += ["PGLossOutput", "logprobs_reference", "pg_loss_reference"]
