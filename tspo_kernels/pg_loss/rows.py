"""K3's row step: the per-token loss and d loss / d logits of one (C, V) logits chunk.

``_pg_rows_kernel`` (Triton, one program per token row) and :func:`core_torch` (PyTorch ops,
float64 allowed) compute the same thing: sweep 1, an online log-sum-exp over vocabulary
blocks, gives log pi(target), the entropy and from them the per-token loss and its derivatives
with respect to log pi (g_lp) and to the entropy (g_ent); sweep 2 overwrites the chunk in place
with d loss / d logits = (g_lp (onehot - p) - g_ent p (z - E[z])) / T.  With ``stats_unit`` > 0
(the filtered path) sweep 1 also keeps each row's lse, E[z], g_lp, g_ent and, for every
``stats_unit``-wide vocabulary unit, its largest z and its log-sum-exp, and sweep 2 is left to the
filtered step.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch
import triton
import triton.language as tl

from .._checks import INTERPRET
from .options import LossOptions

__all__ = ["core_torch", "core_triton", "k3_and_expm1", "row_launch", "token_terms_torch", "unit_logsumexp",
           "unit_max"]


# --------------------------------------------------------------------------- Triton kernel
@triton.jit
def _finite(x):
    return tl.abs(x) < float("inf")


@triton.jit
def _pg_rows_kernel(
    logits_ptr, stride_row, targets_ptr,
    mask_ptr, old_ptr, adv_ptr, ref_ptr, roll_ptr, w_ptr, inv_norm_ptr,
    logp_ptr, ent_ptr, kl_ptr, tok_loss_ptr, clipped_ptr,
    lse_ptr, ez_ptr, glp_ptr, gent_ptr, zmax_ptr, zlse_ptr, n_units,
    V, inv_temp, ratio_lo, ratio_hi, dual_clip, beta, kl_clamp, entropy_coef, tis_cap,
    HAS_LOSS: tl.constexpr, HAS_REF: tl.constexpr, HAS_DUAL: tl.constexpr,
    HAS_TIS: tl.constexpr, HAS_W: tl.constexpr, HAS_OLD: tl.constexpr, WRITE_GRAD: tl.constexpr,
    STATS: tl.constexpr, UNIT: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """One program per token row of a (C, V) logits chunk.

    Sweep 1: online max / sum exp / sum exp*z over vocabulary blocks -> lse, E[z], entropy,
    log pi(target) and the per-token loss terms (STATS: also the row's lse, E[z], g_lp, g_ent
    and the largest z and the log-sum-exp of z of every UNIT-wide vocabulary unit).  Sweep 2 (WRITE_GRAD): overwrite the
    row with d loss / d logits = (g_lp * (onehot - p) - g_ent * p * (z - E[z])) / temperature;
    rows outside the loss mask get 0.  All arithmetic is float32 (16-bit logits are upcast).
    """
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    offs = tl.arange(0, BLOCK_V)
    m = float("-inf")
    s = 0.0
    t = 0.0
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        valid = cols < V
        z = tl.load(base + cols, mask=valid, other=0.0).to(tl.float32) * inv_temp
        zm = tl.where(valid, z, float("-inf"))
        m_new = tl.maximum(m, tl.max(zm, axis=0))
        alpha = tl.exp(m - m_new)
        e = tl.where(valid, tl.exp(z - m_new), 0.0)
        s = s * alpha + tl.sum(e, axis=0)
        t = t * alpha + tl.sum(e * z, axis=0)
        m = m_new
        if STATS:                                        # per unit: largest z and log sum exp z
            zu = tl.max(tl.reshape(zm, (BLOCK_V // UNIT, UNIT)), axis=1)
            su = tl.sum(tl.reshape(e, (BLOCK_V // UNIT, UNIT)), axis=1)
            uo = start // UNIT + tl.arange(0, BLOCK_V // UNIT)
            tl.store(zmax_ptr + row * n_units + uo, zu, mask=uo < n_units)
            tl.store(zlse_ptr + row * n_units + uo, m_new + tl.log(su), mask=uo < n_units)
    lse = m + tl.log(s)
    ez = t / s
    ent = lse - ez
    y = tl.load(targets_ptr + row).to(tl.int64)
    logp = tl.load(base + y).to(tl.float32) * inv_temp - lse
    tl.store(logp_ptr + row, logp)
    tl.store(ent_ptr + row, ent)

    if HAS_LOSS:
        in_loss = tl.load(mask_ptr + row) != 0
        adv = tl.load(adv_ptr + row)
        fin = _finite(logp) & _finite(ent) & _finite(adv)
        if HAS_OLD:
            old = tl.load(old_ptr + row)
            fin = fin & _finite(old)
        else:                                            # on-policy: pi_old = pi (rho = 1)
            old = logp
        rho = tl.exp(logp - old)
        pg_plain = -rho * adv
        pg_clip = -tl.minimum(tl.maximum(rho, ratio_lo), ratio_hi) * adv
        plain = pg_plain >= pg_clip
        pg = tl.where(plain, pg_plain, pg_clip)
        g_lp = tl.where(plain, pg_plain, 0.0)            # d pg / d logp
        clipped = plain == 0
        if HAS_DUAL:
            cap = -dual_clip * adv
            dual = (adv < 0) & (pg > cap)
            pg = tl.where(dual, cap, pg)
            g_lp = tl.where(dual, 0.0, g_lp)
            clipped = clipped | dual
        if HAS_TIS:
            roll = tl.load(roll_ptr + row)
            fin = fin & _finite(roll)
            w = tl.minimum(tl.exp(old - roll), tis_cap)
            pg = pg * w
            g_lp = g_lp * w
        total = pg - entropy_coef * ent
        kl = 0.0
        if HAS_REF:
            ref = tl.load(ref_ptr + row)
            fin = fin & (_finite(ref) | (beta == 0.0))   # with beta = 0 ref_logp is a metric only
            d = ref - logp
            # exp(d) - d - 1 and exp(d) - 1 cancel for small |d|: Taylor series there
            small = tl.abs(d) < 0.5
            ds = tl.where(small, d, 0.0)
            poly = ds * (1.0 / 362880.0) + 1.0 / 40320.0     # sum_{k=2..9} d^(k-2) / k!
            poly = ((((poly * ds + 1.0 / 5040.0) * ds + 1.0 / 720.0) * ds + 1.0 / 120.0) * ds
                    + 1.0 / 24.0) * ds
            poly = (poly + 1.0 / 6.0) * ds + 0.5
            ed = tl.exp(d)
            raw = tl.where(small, ds * ds * poly, ed - d - 1.0)
            em1 = tl.where(small, ds + ds * ds * poly, ed - 1.0)
            kl = tl.minimum(raw, kl_clamp, propagate_nan=tl.PropagateNan.ALL)
            total = total + beta * kl
            g_lp = g_lp - beta * tl.where(raw <= kl_clamp, em1, 0.0)
        inv_norm = tl.load(inv_norm_ptr)
        if HAS_W:                                        # per-token weight of the objective
            tw = tl.load(w_ptr + row)
            fin = fin & _finite(tw)
            total = total * tw
            inv_norm = inv_norm * tw                     # scales both gradient terms below
        bad = in_loss & (fin == 0)                       # a non-finite input reaches the loss
        total = tl.where(bad, float("nan"), total)
        g_lp = tl.where(in_loss, tl.where(bad, float("nan"), g_lp * inv_norm), 0.0)
        g_ent = tl.where(in_loss, -entropy_coef * inv_norm, 0.0)
        tl.store(tok_loss_ptr + row, tl.where(in_loss, total, 0.0))
        tl.store(kl_ptr + row, tl.where(in_loss, kl, 0.0))
        tl.store(clipped_ptr + row, tl.where(in_loss & clipped & (bad == 0), 1.0, 0.0))
        if STATS:
            tl.store(lse_ptr + row, lse)
            tl.store(ez_ptr + row, ez)
            tl.store(glp_ptr + row, g_lp)
            tl.store(gent_ptr + row, g_ent)

        if WRITE_GRAD:
            for start in range(0, V, BLOCK_V):
                cols = start + offs
                valid = cols < V
                z = tl.load(base + cols, mask=valid, other=0.0).to(tl.float32) * inv_temp
                p = tl.exp(z - lse)
                dz = tl.where(cols == y, g_lp, 0.0) - p * (g_lp + g_ent * (z - ez))
                dz = tl.where(in_loss, dz * inv_temp, 0.0)
                tl.store(base + cols, dz.to(logits_ptr.dtype.element_ty), mask=valid)



# --------------------------------------------------------------------------- launch and PyTorch core
def k3_and_expm1(d):
    """(exp(d) - d - 1, exp(d) - 1) without the cancellation at small |d| (as in the kernel):
    below |d| = 0.5 a Taylor sum to d^K / K!, whose truncation, relative to exp(d) - d - 1, is
    under 2 * 0.5^(K-1) / (K+1)!: 2e-9 with the kernel's K = 9 (float32 and 16-bit inputs),
    6e-18 with K = 15 for float64 inputs."""
    top = 15 if d.dtype == torch.float64 else 9
    small = d.abs() < 0.5
    ds = torch.where(small, d, torch.zeros_like(d))
    poly = torch.full_like(d, 1.0 / math.factorial(top))
    for k in range(top - 1, 1, -1):                  # sum_{k=2..top} d^(k-2) / k!
        poly = poly * ds + 1.0 / math.factorial(k)
    ed = torch.exp(d)
    return (torch.where(small, ds * ds * poly, ed - d - 1.0),
            torch.where(small, ds + ds * ds * poly, ed - 1.0))


def token_terms_torch(logp, ent, tok, opt: LossOptions, inv_norm):
    """Per-token loss, kl, clipped flag and d loss / d logp, d loss / d entropy (masked, scaled)."""
    mask, adv = tok["mask"], tok["advantages"]
    old = tok.get("old_logp", logp)                   # None given: on-policy, rho = 1
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    nan = torch.full((), float("nan"), dtype=logp.dtype, device=logp.device)
    fin = torch.isfinite(logp) & torch.isfinite(ent) & torch.isfinite(adv) & torch.isfinite(old)
    rho = torch.exp(logp - old)
    pg_plain = -rho * adv
    pg_clip = -rho.clamp(1.0 - opt.eps_low, 1.0 + opt.eps_high) * adv
    plain = pg_plain >= pg_clip
    pg = torch.where(plain, pg_plain, pg_clip)
    g_lp = torch.where(plain, pg_plain, zero)
    clipped = ~plain
    if opt.dual_clip is not None:
        cap = -opt.dual_clip * adv
        dual = (adv < 0) & (pg > cap)
        pg = torch.where(dual, cap, pg)
        g_lp = torch.where(dual, zero, g_lp)
        clipped = clipped | dual
    if opt.tis_cap is not None:
        fin = fin & torch.isfinite(tok["rollout_logp"])
        w = torch.exp(old - tok["rollout_logp"]).clamp(max=opt.tis_cap)
        pg, g_lp = pg * w, g_lp * w
    total = pg - opt.entropy_coef * ent
    kl = torch.zeros_like(logp)
    if opt.has_ref:
        if opt.beta != 0.0:
            fin = fin & torch.isfinite(tok["ref_logp"])
        raw, em1 = k3_and_expm1(tok["ref_logp"] - logp)
        kl = raw.clamp(max=opt.kl_clamp)
        total = total + opt.beta * kl
        g_lp = g_lp - opt.beta * torch.where(raw <= opt.kl_clamp, em1, zero)
    if "weights" in tok:                              # per-token weight of the objective
        tw = tok["weights"]
        fin = fin & torch.isfinite(tw)
        total, inv_norm = total * tw, inv_norm * tw    # inv_norm scales g_lp and g_ent below
    bad = mask & ~fin                                 # a non-finite input reaches the loss
    g_ent = torch.where(mask, -opt.entropy_coef * inv_norm, zero)
    return {
        "tok_loss": torch.where(mask, torch.where(bad, nan, total), zero),
        "kl": torch.where(mask, kl, zero),
        "clipped": (clipped & mask & ~bad).to(logp.dtype),
        "g_lp": torch.where(mask, torch.where(bad, nan, g_lp * inv_norm), zero),
        "g_ent": g_ent,
    }


def _units(z: torch.Tensor, unit: int) -> torch.Tensor:
    C, V = z.shape
    n = triton.cdiv(V, unit)
    return torch.nn.functional.pad(z, (0, n * unit - V), value=float("-inf")).view(C, n, unit)


def unit_max(z: torch.Tensor, unit: int) -> torch.Tensor:
    """(C, ceil(V / unit)): the largest entry of every ``unit``-wide column block of z."""
    return _units(z, unit).amax(-1)


def unit_logsumexp(z: torch.Tensor, unit: int) -> torch.Tensor:
    """(C, ceil(V / unit)): log sum exp of every ``unit``-wide column block of z."""
    return torch.logsumexp(_units(z, unit), -1)


def core_torch(logits, y, tok, opt: LossOptions, inv_norm, *, write_grad: bool, has_loss: bool,
               need_entropy: bool = True, stats_unit: int = 0) -> dict:
    """PyTorch version of the row kernel on one (C, V) chunk; returns per-token (C,) results.

    Uses log_softmax (ls) and p = exp(ls): z - E[z] = ls + entropy, so
    d loss / d z = onehot * g_lp - p * (g_lp + g_ent * (ls + entropy)).
    ``stats_unit`` > 0 (the filtered path): also lse, E[z], g_lp, g_ent, the unit maxima and the
    units' log-sum-exp.
    """
    cd = torch.float64 if logits.dtype == torch.float64 else torch.float32
    z = logits.to(cd)                      # the chunk itself when it is already ``cd``
    keep = bool(stats_unit) and z is logits            # the filtered path reads the logits again
    if opt.temperature != 1.0:
        z = z * (1.0 / opt.temperature) if keep else z.mul_(1.0 / opt.temperature)
    res = {}
    if stats_unit:
        res["zmax"], res["zlse"] = unit_max(z, stats_unit), unit_logsumexp(z, stats_unit)
        res["lse"] = torch.logsumexp(z, dim=1)
    ls = torch.log_softmax(z, dim=1)
    res["logp"] = ls.gather(1, y[:, None])[:, 0]
    if not (has_loss or need_entropy):
        return res
    p = ls.exp()
    if stats_unit:
        res["ez"] = (p * z).sum(1)
    if keep or z is logits and not write_grad:
        res["entropy"] = -(p * ls).sum(1)
    else:
        res["entropy"] = -torch.mul(p, ls, out=z).sum(1)    # z is free now: scratch
    if not has_loss:
        return res
    res.update(token_terms_torch(res["logp"], res["entropy"], tok, opt, inv_norm))
    if write_grad:
        inv_t = 1.0 / opt.temperature
        g_lp = (res["g_lp"] * inv_t)[:, None]
        dz = logits if logits.dtype == cd else p         # write in place where dtypes allow
        if opt.entropy_coef != 0.0:
            g_ent = (res["g_ent"] * inv_t)[:, None]
            ls.mul_(-g_ent).sub_(g_lp + g_ent * res["entropy"][:, None])
            torch.mul(ls, p, out=dz)
        else:
            torch.mul(p, -g_lp, out=dz)
        dz.scatter_add_(1, y[:, None], g_lp)
        off = ~tok["mask"] & ~(torch.isfinite(res["logp"]) & torch.isfinite(res["entropy"]))
        if bool(off.any()):                               # NaN rows outside the loss: exactly 0
            dz[off] = 0.0
        if dz is not logits:
            logits.copy_(dz)
    return res


def row_launch(V: int, unit: int = 1, *, interpret: bool = INTERPRET) -> Tuple[int, int]:
    """(BLOCK_V, num_warps) of the row kernels (``_pg_rows_kernel`` and the filtered path's
    ``_soft_grad_kernel``) for a vocabulary of V: the compile check (``bench/kernel_resources.py``)
    builds every configuration this returns compiled."""
    cap = 128 if interpret else 4096     # the interpreter: small blocks, several of them
    block = max(unit, min(cap, triton.next_power_of_2(V)))
    return block, (8 if block >= 2048 else 4)


def core_triton(logits, y, tok, opt: LossOptions, inv_norm, *, write_grad: bool, has_loss: bool,
                need_entropy: bool = True, stats_unit: int = 0) -> dict:
    """Triton row kernel on one contiguous (C, V) chunk; returns per-token (C,) results
    (``stats_unit`` > 0: also lse, E[z], g_lp, g_ent and the (C, ceil(V/unit)) unit maxima and
    log-sum-exps)."""
    rows, V = logits.shape
    f32 = dict(dtype=torch.float32, device=logits.device)
    res = {"logp": torch.empty(rows, **f32), "entropy": torch.empty(rows, **f32)}
    if has_loss:
        res.update({k: torch.empty(rows, **f32) for k in ("tok_loss", "kl", "clipped")})
    stats = bool(stats_unit) and has_loss
    n_units = triton.cdiv(V, stats_unit) if stats else 1
    if stats:
        res.update({k: torch.empty(rows, **f32) for k in ("lse", "ez", "g_lp", "g_ent")})
        res["zmax"] = torch.empty(rows, n_units, **f32)
        res["zlse"] = torch.empty(rows, n_units, **f32)
    dummy = res["logp"]
    get = lambda k: res.get(k, dummy)
    tk = lambda k: tok.get(k, dummy)
    mask = tok["mask"].to(torch.int8) if has_loss else dummy
    block, warps = row_launch(V, stats_unit if stats else 1)
    _pg_rows_kernel[(rows,)](
        logits, logits.stride(0), y,
        mask, tk("old_logp"), tk("advantages"), tk("ref_logp"), tk("rollout_logp"), tk("weights"),
        inv_norm if has_loss else dummy,
        res["logp"], res["entropy"], get("kl"), get("tok_loss"), get("clipped"),
        get("lse"), get("ez"), get("g_lp"), get("g_ent"), get("zmax"), get("zlse"), n_units,
        V, opt.inv_temp, 1.0 - opt.eps_low, 1.0 + opt.eps_high,
        opt.dual_clip or 0.0, opt.beta, opt.kl_clamp, opt.entropy_coef, opt.tis_cap or 0.0,
        HAS_LOSS=has_loss, HAS_REF=opt.has_ref, HAS_DUAL=opt.dual_clip is not None,
        HAS_TIS=opt.tis_cap is not None, HAS_W="weights" in tok, HAS_OLD="old_logp" in tok,
        WRITE_GRAD=write_grad, STATS=stats, UNIT=stats_unit if stats else 1, BLOCK_V=block,
        num_warps=warps,
    )
    return res

