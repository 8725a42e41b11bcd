"""K3: fused LM head + masked clipped policy-gradient loss (docs/algorithm.md §4, §5 K3).

``fused_linear_pg_loss`` computes, for hidden states ``h`` (N, H) and an LM-head weight ``W``
(V, H), the docs/algorithm.md §4 objective of every loss-masked token without ever holding the
(N, V) logits: tokens are processed ``C`` rows at a time (the *chunk*).  Per chunk

1. ``logits = h_c W^T (+ b)``                 (C, V) in the input dtype (a cuBLAS product)
2. one row per program: an online log-sum-exp over vocabulary blocks gives log pi(target),
   the entropy and, from them, the per-token loss and its derivative with respect to log pi
   and to the entropy.  Those two numbers fix the whole gradient row, so a second sweep over
   the row overwrites the logits *in place* with d loss / d logits.
3. ``grad_h[c] = dlogits @ W`` and ``grad_W += dlogits^T @ h_c``  (two more products)

Three matrix products in all, no recomputation: the gradients are computed in the forward pass
and saved; backward only scales them by the incoming gradient.

**Dense path** (``backward="dense"``, the default).  For 16-bit weights split over several
chunks the weight gradient is accumulated in float32 *inside* the product (cuBLAS
``C = A B + C`` with a float32 C: ``torch.ops.aten.addmm.dtype_out``, torch >= 2.8 on CUDA; where
the build lacks it, a Triton GEMM whose epilogue adds into the float32 accumulator): no
(V, H) product is stored on its own.  The chunk ``C`` comes from a memory budget
(``memory_budget``, default :data:`MEMORY_BUDGET` on CUDA): the float32 accumulator (4 V H
bytes), ``grad_hidden`` and one (C, V) logits chunk fit in it, so the accumulator's traffic
(8 V H bytes per chunk) is a few percent of the chunk's products (6 C V H FLOP).

**Gradient-filtered path** (``backward="filtered"``).  Most of a trained policy's softmax mass
sits on few tokens, so most entries of d loss / d logits are far below what a 16-bit product
resolves.  Write d loss / d z_tv = g_lp [v = y_t] + S_tv with the *soft part*
S_tv = -p_tv (g_lp + g_ent (z_tv - E_t[z])) (z = logits / T, g_lp = d loss / d log pi,
g_ent = d loss / d entropy of row t).  Sweep 1 also stores, per row and vocabulary unit of
``UNIT`` columns, the largest z of the unit, M_tu; from it

    U_tu = |g_lp| e^(M_tu - lse_t) + |g_ent| F(M_tu),
    F(M) = max(e^(M - lse)(M - E)^+, e^(z* - lse)(E - z*)),  z* = min(M, E - 1)

bounds |S_tv| for every v of unit u (p_v <= e^(M - lse); p_v |z_v - E| <= sup_{z <= M}
e^(z - lse)|z - E|, which F is: e^(z-lse)(z-E) grows for z >= E, e^(z-lse)(E-z) peaks at
z = E - 1).  A tile of (rows x units) is *skipped* by a product when every row t in it has
U_tu <= tau (|g_lp| + |g_ent|) (tau = ``filter_threshold``, default 2^-12): every entry it
drops is at most tau (|g_lp,t| + |g_ent,t|) / T in size.  The target term g_lp [v = y] is
never dropped (it is added exactly, as a row gather / scatter).  Only kept tiles are written
by sweep 2 and multiplied: block-sparse Triton products over lists of kept tiles, one for
grad_hidden (tiles of ``FILTER_TILES["dh"]``) and one for grad_weight (``FILTER_TILES["dw"]``).
Error admitted, per token row t with dropped entries D_t (per product):

    sum_{v in D_t} |delta_tv| <= (|g_lp,t| m_t + |g_ent,t| q_t) / T,
    m_t = sum_{D_t} p_tv,  q_t = sum_{D_t} p_tv |z_tv - E_t|,   each |delta_tv| <= tau (|g_lp,t| + |g_ent,t|) / T

so |err grad_h[t, j]| <= max_v |W_vj| sum_{D_t} |delta_tv| and |err grad_W[v, j]| <= max_t
|h_tj| sum_t |delta_tv|; ``filter_stats["dropped_l1_bound_dh" / "_dw"]`` reports
sum over dropped tiles of U x unit width / T, an upper bound on sum |delta| of each product.
A chunk whose kept share of tiles (both products) exceeds ``filter_dense_above`` (default
0.75) gains little from skipping: it runs sweep 2 over the whole chunk and the dense products
instead (exact for that chunk; ``filter_stats["dense_chunks"]`` counts them).
``vocab_order="mean_logit"`` (default for the filtered path) sorts the vocabulary by its mean
logit over the loss-masked tokens before tiling (the products run on a permuted copy of W;
gradients come back in the original order), which clusters the mass into fewer tiles.
The filtered path computes the same forward outputs as the dense path.

Step 2 runs as a Triton kernel (``backend="triton"``, the default on CUDA) or as PyTorch ops
(``backend="torch"``, the default on CPU; float64 allowed).

**Non-finite inputs** (one policy, every backend; docs/algorithm.md §5): a NaN or inf in any
input that enters the objective of a loss-masked token (its hidden row, W, b, old_logp,
advantages, weights, rollout_logp with tis_cap, ref_logp with beta != 0) makes that token's
objective NaN: the loss is NaN, and so are its gradient row and therefore grad_weight.  Tokens
outside the loss mask never reach the loss or the gradients: NaN/inf in their hidden rows or
per-token inputs leave both unchanged (their grad_hidden rows are 0); their per-token outputs
(logp, entropy) are computed as usual.  ``normalizer`` must be finite and > 0 (ValueError).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
import triton
import triton.language as tl

from . import _checks, reference
from .reference import PGLossOutput

__all__ = ["PGLossOutput", "fused_linear_logprobs", "fused_linear_pg_loss", "MEMORY_BUDGET", "FILTER_TILES"]

_HALF = (torch.float16, torch.bfloat16)
_MASK_DTYPES = (torch.bool,) + _checks.INT_DTYPES + _checks.FLOAT_DTYPES
#: Triton's interpreter multiplies bf16 wrongly: the filtered products upcast their operands there
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")

#: default extra memory of one call on CUDA (bytes): accumulator + grad_hidden + logits chunk
MEMORY_BUDGET = int(3.75 * 2**30)
#: skip units of the filtered products: (token rows, vocabulary columns) of grad_hidden's ("dh")
#: and grad_weight's ("dw") tiles.  dh rows must be a multiple of dw rows, dw columns a multiple
#: of dh columns (dh columns are the vocabulary unit of the stored maxima, dw rows the row unit).
FILTER_TILES = {"dh": (128, 64), "dw": (32, 128)}
#: hidden columns per program of the filtered products
FILTER_BLOCK_H = 128
BACKWARDS = ("dense", "filtered")
VOCAB_ORDERS = ("mean_logit",)


# --------------------------------------------------------------------------- Triton kernels
@triton.jit
def _finite(x):
    return tl.abs(x) < float("inf")


@triton.jit
def _pg_rows_kernel(
    logits_ptr, stride_row, targets_ptr,
    mask_ptr, old_ptr, adv_ptr, ref_ptr, roll_ptr, w_ptr, inv_norm_ptr,
    logp_ptr, ent_ptr, kl_ptr, tok_loss_ptr, clipped_ptr,
    lse_ptr, ez_ptr, glp_ptr, gent_ptr, zmax_ptr, n_units,
    V, inv_temp, ratio_lo, ratio_hi, dual_clip, beta, kl_clamp, entropy_coef, tis_cap,
    HAS_LOSS: tl.constexpr, HAS_REF: tl.constexpr, HAS_DUAL: tl.constexpr,
    HAS_TIS: tl.constexpr, HAS_W: tl.constexpr, HAS_OLD: tl.constexpr, WRITE_GRAD: tl.constexpr,
    STATS: tl.constexpr, UNIT: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """One program per token row of a (C, V) logits chunk.

    Sweep 1: online max / sum exp / sum exp*z over vocabulary blocks -> lse, E[z], entropy,
    log pi(target) and the per-token loss terms (STATS: also the row's lse, E[z], g_lp, g_ent
    and the largest z of every UNIT-wide vocabulary unit).  Sweep 2 (WRITE_GRAD): overwrite the
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
        if STATS:
            zu = tl.max(tl.reshape(zm, (BLOCK_V // UNIT, UNIT)), axis=1)
            uo = start // UNIT + tl.arange(0, BLOCK_V // UNIT)
            tl.store(zmax_ptr + row * n_units + uo, zu, mask=uo < n_units)
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


@triton.jit
def _soft_grad_kernel(logits_ptr, stride_row, mask_ptr, lse_ptr, ez_ptr, glp_ptr, gent_ptr, keep_ptr, keep_stride,
                      V, inv_temp, ROWS: tl.constexpr, UNIT: tl.constexpr, BLOCK_V: tl.constexpr):
    """Filtered sweep 2: overwrite the kept (ROWS x UNIT) tiles of one row with the soft part
    of d loss / d logits, -p (g_lp + g_ent (z - E[z])) / T (no target term); 0 off the loss mask."""
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    keep_row = keep_ptr + (row // ROWS) * keep_stride
    in_loss = tl.load(mask_ptr + row) != 0
    lse = tl.load(lse_ptr + row)
    ez = tl.load(ez_ptr + row)
    g_lp = tl.load(glp_ptr + row)
    g_ent = tl.load(gent_ptr + row)
    NU: tl.constexpr = BLOCK_V // UNIT
    for start in range(0, V, BLOCK_V):
        uo = start // UNIT + tl.arange(0, NU)
        ku = tl.load(keep_row + uo, mask=uo < keep_stride, other=0) != 0
        if tl.max(ku.to(tl.int32), axis=0) > 0:
            keep = tl.reshape(tl.broadcast_to(ku[:, None], (NU, UNIT)), (BLOCK_V,))
            cols = start + tl.arange(0, BLOCK_V)
            msk = keep & (cols < V)
            z = tl.load(base + cols, mask=msk, other=0.0).to(tl.float32) * inv_temp
            p = tl.exp(z - lse)
            g = -p * (g_lp + g_ent * (z - ez)) * inv_temp
            g = tl.where(in_loss, g, 0.0)
            tl.store(base + cols, g.to(logits_ptr.dtype.element_ty), mask=msk)


@triton.jit
def _filtered_dh_kernel(dl_ptr, s_dl, w_ptr, s_w, y_ptr, coef_ptr, idx_ptr, idx_stride, cnt_ptr, gh_ptr, s_gh,
                        C, V, H, BM: tl.constexpr, BN: tl.constexpr, BH: tl.constexpr, DOT_F32: tl.constexpr):
    """grad_hidden of BM token rows x BH hidden columns: sum over the block's kept vocabulary
    tiles of dlogits[rows, tile] @ W[tile, cols], plus the target term coef_t W[y_t, cols]."""
    i = tl.program_id(0)
    rows = i * BM + tl.arange(0, BM)
    rin = rows < C
    hcol = tl.program_id(1) * BH + tl.arange(0, BH)
    hin = hcol < H
    rows64 = rows.to(tl.int64)
    acc = tl.zeros((BM, BH), tl.float32)
    n = tl.load(cnt_ptr + i)
    for jj in range(0, n):
        u = tl.load(idx_ptr + i * idx_stride + jj).to(tl.int64)
        cols = u * BN + tl.arange(0, BN)
        cin = cols < V
        a = tl.load(dl_ptr + rows64[:, None] * s_dl + cols[None, :], mask=rin[:, None] & cin[None, :], other=0.0)
        w = tl.load(w_ptr + cols[:, None] * s_w + hcol[None, :], mask=cin[:, None] & hin[None, :], other=0.0)
        if DOT_F32:
            acc = tl.dot(a.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w, acc)
    y = tl.load(y_ptr + rows, mask=rin, other=0).to(tl.int64)
    c = tl.load(coef_ptr + rows, mask=rin, other=0.0)
    wy = tl.load(w_ptr + y[:, None] * s_w + hcol[None, :], mask=rin[:, None] & hin[None, :], other=0.0)
    acc += c[:, None] * wy.to(tl.float32)
    tl.store(gh_ptr + rows64[:, None] * s_gh + hcol[None, :], acc.to(gh_ptr.dtype.element_ty),
             mask=rin[:, None] & hin[None, :])


@triton.jit
def _filtered_dw_kernel(dl_ptr, s_dl, h_ptr, s_h, idx_ptr, idx_stride, cnt_ptr, gw_ptr, s_gw, gb_ptr,
                        C, V, H, BM: tl.constexpr, BN: tl.constexpr, BH: tl.constexpr,
                        HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr):
    """grad_weight of BN vocabulary rows x BH hidden columns, added into the float32 accumulator:
    sum over the token blocks that keep this tile of dlogits[block, tile]^T @ h[block, cols]
    (and, with HAS_BIAS, the column sums into grad_bias).

    Grid (hidden blocks, vocabulary tiles): the hidden block varies fastest, so the programs of
    one vocabulary tile run side by side and read its dlogits tiles once from DRAM (then L2);
    the other way round every tile would be read once per hidden block."""
    u = tl.program_id(1)
    n = tl.load(cnt_ptr + u)
    if n > 0:
        cols = u.to(tl.int64) * BN + tl.arange(0, BN)
        cin = cols < V
        hcol = tl.program_id(0) * BH + tl.arange(0, BH)
        hin = hcol < H
        acc = tl.zeros((BN, BH), tl.float32)
        csum = tl.zeros((BN,), tl.float32)
        for jj in range(0, n):
            blk = tl.load(idx_ptr + u * idx_stride + jj).to(tl.int64)
            rows = blk * BM + tl.arange(0, BM)
            rin = rows < C
            a = tl.load(dl_ptr + rows[:, None] * s_dl + cols[None, :], mask=rin[:, None] & cin[None, :], other=0.0)
            h = tl.load(h_ptr + rows[:, None] * s_h + hcol[None, :], mask=rin[:, None] & hin[None, :], other=0.0)
            if DOT_F32:
                acc = tl.dot(tl.trans(a.to(tl.float32)), h.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(tl.trans(a), h, acc)
            if HAS_BIAS:
                csum += tl.sum(a.to(tl.float32), axis=0)
        ptr = gw_ptr + cols[:, None] * s_gw + hcol[None, :]
        msk = cin[:, None] & hin[None, :]
        tl.store(ptr, tl.load(ptr, mask=msk, other=0.0) + acc, mask=msk)
        if HAS_BIAS:
            if tl.program_id(0) == 0:
                tl.store(gb_ptr + cols, tl.load(gb_ptr + cols, mask=cin, other=0.0) + csum, mask=cin)


@triton.jit
def _mm_acc_kernel(a_ptr, b_ptr, c_ptr, M, N, K, s_am, s_ak, s_bk, s_bn, s_cm, s_cn,
                   ACCUMULATE: tl.constexpr, DOT_F32: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                   BK: tl.constexpr, GROUP_M: tl.constexpr):
    """C (float32) = A @ B (+ C with ACCUMULATE): the epilogue adds into the accumulator, so the
    product is never stored on its own.  Grouped tile order for L2 reuse."""
    pid = tl.program_id(0)
    n_m = tl.cdiv(M, BM)
    n_n = tl.cdiv(N, BN)
    group = GROUP_M * n_n
    first_m = (pid // group) * GROUP_M
    size_m = tl.minimum(n_m - first_m, GROUP_M)
    pm = first_m + (pid % group) % size_m
    pn = (pid % group) // size_m
    rm = (pm * BM + tl.arange(0, BM)).to(tl.int64)
    rn = (pn * BN + tl.arange(0, BN)).to(tl.int64)
    acc = tl.zeros((BM, BN), tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        a = tl.load(a_ptr + rm[:, None] * s_am + rk[None, :] * s_ak, mask=(rm < M)[:, None] & (rk < K)[None, :],
                    other=0.0)
        b = tl.load(b_ptr + rk[:, None] * s_bk + rn[None, :] * s_bn, mask=(rk < K)[:, None] & (rn < N)[None, :],
                    other=0.0)
        if DOT_F32:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    ptr = c_ptr + rm[:, None] * s_cm + rn[None, :] * s_cn
    msk = (rm < M)[:, None] & (rn < N)[None, :]
    if ACCUMULATE:
        acc += tl.load(ptr, mask=msk, other=0.0)
    tl.store(ptr, acc, mask=msk)


# --------------------------------------------------------------------------- options
@dataclass(frozen=True)
class _Options:
    eps_low: float
    eps_high: float
    dual_clip: Optional[float]
    beta: float
    kl_clamp: float
    entropy_coef: float
    tis_cap: Optional[float]
    temperature: float
    has_ref: bool


@dataclass
class _Filter:
    """The filtered path's settings: threshold, vocabulary permutation (or None), tiles, stats."""
    threshold: float
    order: Optional[torch.Tensor]
    tiles: dict
    block_h: int
    stats: Optional[dict] = field(default=None)
    dense_above: float = 1.0


def _number(name: str, value, *, low: float, strict: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value < low or (strict and value == low):
        raise ValueError(f"{name} must be {'>' if strict else '>='} {low}, got {value!r}")
    return float(value)


def _options(eps_low, eps_high, dual_clip, beta, kl_clamp, entropy_coef, tis_cap, temperature,
             ref_logp, rollout_logp) -> _Options:
    opt = _Options(
        eps_low=_number("eps_low", eps_low, low=0.0, strict=False),
        eps_high=_number("eps_high", eps_high, low=0.0, strict=False),
        dual_clip=None if dual_clip is None else _number("dual_clip", dual_clip, low=1.0, strict=True),
        beta=_number("beta", beta, low=0.0, strict=False),
        kl_clamp=_number("kl_clamp", kl_clamp, low=0.0, strict=True),
        entropy_coef=_number("entropy_coef", entropy_coef, low=float("-inf"), strict=False),
        tis_cap=None if tis_cap is None else _number("tis_cap", tis_cap, low=0.0, strict=True),
        temperature=_number("temperature", temperature, low=0.0, strict=True),
        has_ref=ref_logp is not None,
    )
    if opt.beta != 0.0 and ref_logp is None:
        raise ValueError("beta != 0 needs ref_logp (the reference policy's log-probs)")
    if (tis_cap is None) != (rollout_logp is None):
        raise ValueError("tis_cap and rollout_logp go together: pass both or neither")
    return opt


# --------------------------------------------------------------------------- validation
def _check_head(hidden, weight, targets, bias):
    """Shapes/dtypes of the LM-head inputs; returns (N, H, V)."""
    _checks.tensor("hidden", hidden, ndim=2, dtypes=_checks.FLOAT_DTYPES)
    _checks.tensor("weight", weight, ndim=2)
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight has dtype {weight.dtype} but hidden has {hidden.dtype}; they must match")
    N, H = hidden.shape
    V = weight.shape[0]
    if weight.shape[1] != H:
        raise ValueError(f"weight has shape {tuple(weight.shape)}; expected (V, {H}) to match hidden (N, H)")
    if V == 0:
        raise ValueError("weight must have at least one row (V >= 1)")
    _checks.tensor("targets", targets, dtypes=_checks.INT_DTYPES, shape=(N,))
    if bias is not None:
        _checks.tensor("bias", bias, shape=(V,))
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias has dtype {bias.dtype} but hidden has {hidden.dtype}; they must match")
    return N, H, V


def _check_targets_range(targets, V):
    if targets.numel() and bool(((targets < 0) | (targets >= V)).any()):
        raise ValueError(f"targets must lie in [0, V) = [0, {V}); got values "
                         f"{int(targets.min())}..{int(targets.max())}")


def _resolve_backend(backend: str, device: torch.device, dtype: torch.dtype) -> bool:
    """True for the Triton kernel, False for the chunked PyTorch path ("reference" is handled
    by the callers: it runs the plain math of :mod:`tspo_kernels.reference`)."""
    _checks.choice("backend", backend, _checks.BACKENDS)
    if backend in ("auto", "reference") and dtype == torch.float64:
        return False
    triton_path = _checks.use_triton(backend, device)
    if triton_path and dtype == torch.float64:
        raise TypeError("backend='triton' takes bfloat16, float16 or float32 hidden; got float64 "
                        "(use backend='torch')")
    return triton_path


def _budget(memory_budget) -> Optional[int]:
    if memory_budget is None:
        return None
    if isinstance(memory_budget, bool) or not isinstance(memory_budget, int) or memory_budget < 1:
        raise ValueError(f"memory_budget must be a positive int (bytes) or None, got {memory_budget!r}")
    return memory_budget


def _chunk_rows(chunk_size, N: int, H: int, V: int, *, device=None, elem: int = 4, torch_path: bool = False,
                need_h: bool = False, need_w: bool = False, weight_half: bool = False, extra_fixed: int = 0,
                extra_per_row: int = 0, budget: Optional[int] = None) -> int:
    """Token rows per chunk.

    ``chunk_size`` given: that (at most N).  Otherwise on CUDA (or whenever ``budget`` is given)
    from a memory budget (default :data:`MEMORY_BUDGET` bytes): what stays for the whole call
    (grad_hidden N H, the float32 weight-gradient accumulator 4 V H for 16-bit weights,
    ``extra_fixed``) is taken off, and the rest holds one (C, V) chunk (``elem`` bytes an entry,
    plus the PyTorch path's float32 buffers and ``extra_per_row``); at least 128 rows, a
    multiple of 128, and the chunks of a call balanced.  On CPU without a budget: about N*H/V
    rows (the logits chunk about the size of ``hidden``), a power of two, at least 256.
    """
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
        return max(1, min(N, chunk_size))
    if N <= 1:
        return 1
    cuda = device is not None and torch.device(device).type == "cuda"
    if budget is None and not cuda:
        rows = triton.next_power_of_2(max(1, triton.cdiv(N, triton.cdiv(V, H))))
        return max(1, min(N, max(256, rows)))
    budget = MEMORY_BUDGET if budget is None else budget
    per_row = V * elem + extra_per_row + (V * 4 * (3 if elem < 4 else 2) if torch_path else 0)
    fixed = (N * H * elem if need_h else 0) + (V * H * 4 if need_w and weight_half else 0) + extra_fixed
    most = (budget - fixed) // per_row
    if most >= N:
        return N
    most = max(128, most // 128 * 128)
    n_chunks = triton.cdiv(N, most)
    return min(N, most, triton.cdiv(triton.cdiv(N, n_chunks), 128) * 128)


def _check_token_inputs(N, **named):
    """Per-token inputs: (N,) float tensors (loss_mask: bool, integer or float)."""
    for name, x in named.items():
        if x is not None:
            dtypes = _MASK_DTYPES if name == "loss_mask" else _checks.FLOAT_DTYPES
            _checks.tensor(name, x, dtypes=dtypes, shape=(N,))


def _token_inputs(cd, loss_mask, **named):
    """Contiguous (N,) ``cd`` copies of the per-token inputs given, and the mask as bool."""
    tok = {k: x.detach().to(cd).contiguous() for k, x in named.items() if x is not None}
    tok["mask"] = (loss_mask.detach() != 0).contiguous()
    return tok


def _check_normalizer(normalizer) -> None:
    """``normalizer``: None, a finite number > 0 or a one-element tensor holding one (a tensor's
    value is read: one device sync on CUDA)."""
    if normalizer is None:
        return
    if isinstance(normalizer, torch.Tensor):
        if normalizer.numel() != 1:
            raise ValueError(f"normalizer must be a number or a one-element tensor, got shape "
                             f"{tuple(normalizer.shape)}")
        value = float(normalizer.detach().reshape(()))
        if not (math.isfinite(value) and value > 0.0):
            raise ValueError(f"normalizer must be finite and > 0, got tensor value {value!r}")
        return
    _number("normalizer", normalizer, low=0.0, strict=True)


def _inv_norm(normalizer, mask, cd, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(1 / normalizer, masked-token count), both 0-dim ``cd`` tensors on ``device``."""
    _check_normalizer(normalizer)
    count = mask.sum().to(cd)
    if normalizer is None:
        return 1.0 / count.clamp(min=1.0), count
    if isinstance(normalizer, torch.Tensor):
        return 1.0 / normalizer.detach().reshape(()).to(device=device, dtype=cd), count
    return torch.full((), 1.0 / float(normalizer), dtype=cd, device=device), count


# --------------------------------------------------------------------------- weight-gradient accumulation
_ACC_OVERRIDE: Optional[str] = None       # tests: force "dtype_out" / "triton" / "upcast"
_DTYPE_OUT_OK: dict = {}


def _dtype_out_ok(device: torch.device, dtype: torch.dtype) -> bool:
    """Does this torch build multiply 16-bit operands into a float32 accumulator on ``device``
    (``aten::addmm.dtype_out``, torch >= 2.8, CUDA)?  Checked once per device and dtype."""
    key = (device.type, device.index, dtype)
    if key not in _DTYPE_OUT_OK:
        ok = False
        if device.type == "cuda":
            try:
                g = torch.Generator(device="cpu").manual_seed(0)
                a = torch.randn(16, 32, generator=g).to(device=device, dtype=dtype)
                b = torch.randn(32, 16, generator=g).to(device=device, dtype=dtype)
                acc = torch.empty(16, 16, dtype=torch.float32, device=device)
                torch.ops.aten.mm.dtype_out(a, b, torch.float32, out=acc)
                torch.ops.aten.addmm.dtype_out(acc, a, b, torch.float32, out=acc)
                want = 2.0 * (a.float() @ b.float())
                ok = bool(torch.allclose(acc, want, rtol=1e-3, atol=1e-3))
            except (RuntimeError, NotImplementedError, AttributeError, TypeError):
                ok = False
        _DTYPE_OUT_OK[key] = ok
    return _DTYPE_OUT_OK[key]


def _acc_strategy(device: torch.device, dtype: torch.dtype) -> str:
    if _ACC_OVERRIDE is not None:
        return _ACC_OVERRIDE
    if device.type == "cuda":
        return "dtype_out" if _dtype_out_ok(device, dtype) else "triton"
    return "upcast"


def _mm_acc_triton(acc, a, b, accumulate: bool):
    M, K = a.shape
    N = b.shape[1]
    f32 = _INTERPRET or a.dtype == torch.float32
    cfg = dict(BM=128, BN=128, BK=64, num_warps=8, num_stages=3) if acc.is_cuda else dict(BM=32, BN=32, BK=32)
    grid = (triton.cdiv(M, cfg["BM"]) * triton.cdiv(N, cfg["BN"]),)
    _mm_acc_kernel[grid](a, b, acc, M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
                         acc.stride(0), acc.stride(1), ACCUMULATE=accumulate, DOT_F32=f32, GROUP_M=8, **cfg)


def _add_product_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, first: bool, strategy: str) -> None:
    """acc (float32) = a @ b (first) or += a @ b, for 16-bit a and b, accumulated inside the product."""
    if strategy == "dtype_out":
        if first:
            torch.ops.aten.mm.dtype_out(a, b, torch.float32, out=acc)
        else:
            torch.ops.aten.addmm.dtype_out(acc, a, b, torch.float32, out=acc)
    elif strategy == "triton":
        _mm_acc_triton(acc, a, b, accumulate=not first)
    elif first:
        torch.mm(a.float(), b.float(), out=acc)
    else:
        acc.addmm_(a.float(), b.float())


# --------------------------------------------------------------------------- per-chunk cores
def _k3_and_expm1(d):
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


def _token_terms_torch(logp, ent, tok, opt: _Options, inv_norm):
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
        raw, em1 = _k3_and_expm1(tok["ref_logp"] - logp)
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


def _unit_max(z: torch.Tensor, unit: int) -> torch.Tensor:
    """(C, ceil(V / unit)): the largest entry of every ``unit``-wide column block of z."""
    C, V = z.shape
    n = triton.cdiv(V, unit)
    pad = torch.nn.functional.pad(z, (0, n * unit - V), value=float("-inf"))
    return pad.view(C, n, unit).amax(-1)


def _core_torch(logits, y, tok, opt, inv_norm, write_grad: bool, has_loss: bool,
                need_entropy: bool = True, stats_unit: int = 0):
    """PyTorch version of the row kernel on one (C, V) chunk; returns per-token (C,) results.

    Uses log_softmax (ls) and p = exp(ls): z - E[z] = ls + entropy, so
    d loss / d z = onehot * g_lp - p * (g_lp + g_ent * (ls + entropy)).
    ``stats_unit`` > 0 (the filtered path): also lse, E[z], g_lp, g_ent and the unit maxima.
    """
    cd = torch.float64 if logits.dtype == torch.float64 else torch.float32
    z = logits.to(cd)                      # the chunk itself when it is already ``cd``
    keep = bool(stats_unit) and z is logits            # the filtered path reads the logits again
    if opt.temperature != 1.0:
        z = z * (1.0 / opt.temperature) if keep else z.mul_(1.0 / opt.temperature)
    res = {}
    if stats_unit:
        res["zmax"] = _unit_max(z, stats_unit)
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
    res.update(_token_terms_torch(res["logp"], res["entropy"], tok, opt, inv_norm))
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


def _block_v(V: int, device: torch.device, unit: int = 1) -> int:
    cap = 4096 if device.type == "cuda" else 128   # the interpreter: small blocks, several of them
    return max(unit, min(cap, triton.next_power_of_2(V)))


def _core_triton(logits, y, tok, opt, inv_norm, write_grad: bool, has_loss: bool,
                 need_entropy: bool = True, stats_unit: int = 0):
    """Triton row kernel on one contiguous (C, V) chunk; returns per-token (C,) results
    (``stats_unit`` > 0: also lse, E[z], g_lp, g_ent and the (C, ceil(V/unit)) unit maxima)."""
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
    dummy = res["logp"]
    get = lambda k: res.get(k, dummy)
    tk = lambda k: tok.get(k, dummy)
    mask = tok["mask"].to(torch.int8) if has_loss else dummy
    block = _block_v(V, logits.device, stats_unit if stats else 1)
    _pg_rows_kernel[(rows,)](
        logits, logits.stride(0), y,
        mask, tk("old_logp"), tk("advantages"), tk("ref_logp"), tk("rollout_logp"), tk("weights"),
        inv_norm if has_loss else dummy,
        res["logp"], res["entropy"], get("kl"), get("tok_loss"), get("clipped"),
        get("lse"), get("ez"), get("g_lp"), get("g_ent"), get("zmax"), n_units,
        V, 1.0 / opt.temperature, 1.0 - opt.eps_low, 1.0 + opt.eps_high,
        opt.dual_clip or 0.0, opt.beta, opt.kl_clamp, opt.entropy_coef, opt.tis_cap or 0.0,
        HAS_LOSS=has_loss, HAS_REF=opt.has_ref, HAS_DUAL=opt.dual_clip is not None,
        HAS_TIS=opt.tis_cap is not None, HAS_W="weights" in tok, HAS_OLD="old_logp" in tok,
        WRITE_GRAD=write_grad, STATS=stats, UNIT=stats_unit if stats else 1, BLOCK_V=block,
        num_warps=8 if block >= 2048 else 4,
    )
    return res


# --------------------------------------------------------------------------- the filter
def _check_tiles(tiles: dict):
    (bm2, bn2), (bm3, bn3) = tiles["dh"], tiles["dw"]
    for v in (bm2, bn2, bm3, bn3):
        if v < 16 or v & (v - 1):
            raise ValueError(f"filter tiles must be powers of two >= 16, got {tiles}")
    if bm2 % bm3 or bn3 % bn2:
        raise ValueError(f"filter tiles: dh rows must be a multiple of dw rows and dw columns a multiple of "
                         f"dh columns, got {tiles}")


def _filter_plan(res: dict, C: int, V: int, filt: _Filter, inv_t: float) -> dict:
    """Which tiles each filtered product keeps, from the forward's unit maxima (PyTorch ops)."""
    (bm2, unit), (r0, bn3) = filt.tiles["dh"], filt.tiles["dw"]
    m2, k3 = bm2 // r0, bn3 // unit
    zmax, lse, ez = res["zmax"], res["lse"][:, None], res["ez"][:, None]
    a, c = res["g_lp"].abs(), res["g_ent"].abs()
    s = a + c
    P = torch.exp(zmax - lse)
    zs = torch.minimum(zmax, ez - 1.0)
    F = torch.maximum(P * (zmax - ez).clamp(min=0.0), torch.exp(zs - lse) * (ez - zs))
    U = a[:, None] * P + c[:, None] * F                  # >= |soft part| of every entry of the unit
    active = s != 0                                      # NaN rows are active: their NaN must spread
    keep = active[:, None] & ~(U <= filt.threshold * s[:, None])
    nU = keep.shape[1]
    nb2, nUp = triton.cdiv(C, bm2), triton.cdiv(nU, k3) * k3
    Cp = nb2 * bm2
    kp = torch.zeros(Cp, nUp, dtype=torch.bool, device=keep.device)
    kp[:C, :nU] = keep
    fine = kp.view(Cp // r0, r0, nUp).any(1)                          # (rows / r0, units)
    dh = fine.view(nb2, m2, nUp).any(1)                               # (rows / bm2, units)
    dw = fine.view(Cp // r0, nUp // k3, k3).any(2)                    # (rows / r0, units / k3)
    tiles_dh, tiles_dw = nb2 * triton.cdiv(V, unit), triton.cdiv(C, r0) * triton.cdiv(V, bn3)
    dense = False
    if filt.dense_above < 1.0:          # one host sync per chunk: is the sparse sweep worth it here?
        kept = float(dh.sum() + dw.sum()) / (tiles_dh + tiles_dw)
        if kept > filt.dense_above:
            dense = True
            dh = torch.zeros_like(dh)
            dh[:, :nU] = True
            dw = torch.zeros_like(dw)
            dw[:triton.cdiv(C, r0)] = True
    write = dh.repeat_interleave(m2, 0) | dw.repeat_interleave(k3, 1)
    plan = {"dh": dh, "dw": dw, "write": write, "dense": dense}
    if filt.stats is not None:
        Ue = torch.where(active[:, None], U, torch.zeros((), dtype=U.dtype, device=U.device))
        drop_dh = ~dh.repeat_interleave(bm2, 0)[:C, :nU]
        drop_dw = ~dw.repeat_interleave(r0, 0).repeat_interleave(k3, 1)[:C, :nU]
        plan["dropped_dh"] = (Ue * drop_dh).sum() * (unit * inv_t)
        plan["dropped_dw"] = (Ue * drop_dw).sum() * (unit * inv_t)
        plan["row_scale"] = torch.where(active, s, torch.zeros((), dtype=s.dtype, device=s.device)).sum() * inv_t
        plan["tiles_dh"], plan["tiles_dw"] = tiles_dh, tiles_dw
    return plan


def _kept_lists(mask: torch.Tensor):
    """Per row of ``mask``: the indices of its True columns first (stable), and their count."""
    idx = torch.argsort((~mask).to(torch.int8), dim=1, stable=True).to(torch.int32).contiguous()
    return idx, mask.sum(1, dtype=torch.int32).contiguous()


def _expand(mask: torch.Tensor, rows: int, cols: int, C: int, V: int) -> torch.Tensor:
    return mask.repeat_interleave(rows, 0).repeat_interleave(cols, 1)[:C, :V]


def _filtered_products(logits, res, plan, h_w, w_p, y_p, mask, gh_c, gw_acc, gb_acc, filt: _Filter,
                       inv_t: float, triton_path: bool):
    """The filtered sweep 2 and the two block-sparse products of one chunk (grad_hidden rows of
    the chunk into ``gh_c``; grad_weight / grad_bias added into the float32 accumulators)."""
    C, V = logits.shape
    H = h_w.shape[1]
    (bm2, unit), (r0, bn3) = filt.tiles["dh"], filt.tiles["dw"]
    coef = res["g_lp"] * inv_t                            # the target term's coefficient
    if triton_path:
        write = plan["write"].to(torch.uint8).contiguous()
        block = _block_v(V, logits.device, unit)
        _soft_grad_kernel[(C,)](logits, logits.stride(0), mask.to(torch.int8), res["lse"], res["ez"], res["g_lp"],
                                res["g_ent"], write, write.shape[1], V, inv_t, ROWS=r0, UNIT=unit, BLOCK_V=block,
                                num_warps=8 if block >= 2048 else 4)
        if plan["dense"]:               # every tile kept: the soft part fills the chunk, dense products
            _dense_products(logits, logits, coef, w_p, y_p, h_w, gh_c, gw_acc, gb_acc)
            return _target_term(coef, h_w, y_p, gw_acc, gb_acc)
        f32 = _INTERPRET or logits.dtype == torch.float32
        bh = min(filt.block_h, max(16, triton.next_power_of_2(H)))
        if gh_c is not None:
            idx, cnt = _kept_lists(plan["dh"])
            _filtered_dh_kernel[(plan["dh"].shape[0], triton.cdiv(H, bh))](
                logits, logits.stride(0), w_p, w_p.stride(0), y_p, coef.contiguous(), idx, idx.shape[1], cnt,
                gh_c, gh_c.stride(0), C, V, H, BM=bm2, BN=unit, BH=bh, DOT_F32=f32, num_warps=4)
        if gw_acc is not None or gb_acc is not None:
            idx, cnt = _kept_lists(plan["dw"].t())
            gw_t = gw_acc if gw_acc is not None else torch.empty(1, 1, dtype=torch.float32, device=logits.device)
            _filtered_dw_kernel[(triton.cdiv(H, bh) if gw_acc is not None else 1, plan["dw"].shape[1])](
                logits, logits.stride(0), h_w, h_w.stride(0), idx, idx.shape[1], cnt, gw_t, gw_t.stride(0),
                gb_acc if gb_acc is not None else gw_t, C, V, H if gw_acc is not None else 0, BM=r0, BN=bn3, BH=bh,
                HAS_BIAS=gb_acc is not None, DOT_F32=f32, num_warps=4)
    else:
        cd = res["lse"].dtype
        z = logits.to(cd) * inv_t
        p = torch.exp(z - res["lse"][:, None])
        soft = -p * (res["g_lp"][:, None] + res["g_ent"][:, None] * (z - res["ez"][:, None])) * inv_t
        soft = torch.where(mask[:, None], soft, torch.zeros((), dtype=cd, device=soft.device))
        if plan["dense"]:
            dl = soft.to(logits.dtype)
            _dense_products(dl, dl, coef, w_p, y_p, h_w, gh_c, gw_acc, gb_acc)
        else:
            zero = torch.zeros((), dtype=cd, device=soft.device)
            dh = torch.where(_expand(plan["dh"], bm2, unit, C, V), soft, zero).to(logits.dtype)
            dw = torch.where(_expand(plan["dw"], r0, bn3, C, V), soft, zero).to(logits.dtype)
            _dense_products(dh, dw, coef, w_p, y_p, h_w, gh_c, gw_acc, gb_acc)
    _target_term(coef, h_w, y_p, gw_acc, gb_acc)


def _dense_products(dh, dw, coef, w_p, y_p, h_w, gh_c, gw_acc, gb_acc) -> None:
    """grad_hidden = dh W_p + coef W_p[y] (the target term's row gather), grad_weight += dw^T h
    (float32 accumulation for 16-bit operands), grad_bias += column sums of dw; ``dh`` / ``dw``
    are the (C, V) soft parts in the logits' dtype (filtered: dropped tiles zeroed)."""
    cd = coef.dtype
    if gh_c is not None:
        gh_c.copy_((dh @ w_p).to(cd) + coef[:, None] * w_p[y_p].to(cd))
    if gw_acc is not None:
        if gw_acc.dtype == dw.dtype:
            gw_acc.addmm_(dw.t(), h_w)
        else:
            _add_product_(gw_acc, dw.t(), h_w, False, _acc_strategy(dw.device, dw.dtype))
    if gb_acc is not None:
        gb_acc.add_(dw.sum(0, dtype=gb_acc.dtype))


def _target_term(coef, h_w, y_p, gw_acc, gb_acc) -> None:
    """The target term of grad_weight / grad_bias, exactly: coef h_t scattered onto row y_t."""
    if gw_acc is not None:
        gw_acc.index_add_(0, y_p, (coef[:, None] * h_w.to(coef.dtype)).to(gw_acc.dtype))
    if gb_acc is not None:
        gb_acc.index_add_(0, y_p, coef.to(gb_acc.dtype))


def _vocab_permutation(vocab_order, hidden, weight, bias, mask) -> Optional[torch.Tensor]:
    """The vocabulary order of the filtered path: None (as is), "mean_logit" (descending mean
    logit over the loss-masked tokens: W mean(h) + b) or a given permutation of range(V)."""
    V = weight.shape[0]
    if vocab_order is None:
        return None
    if isinstance(vocab_order, str):
        _checks.choice("vocab_order", vocab_order, VOCAB_ORDERS)
        with torch.no_grad():
            m = mask.to(hidden.dtype)
            hbar = (m @ hidden) / mask.sum().clamp(min=1).to(hidden.dtype)
            zbar = (weight @ hbar).float()
            if bias is not None:
                zbar = zbar + bias.float()
            return torch.argsort(zbar, descending=True, stable=True)
    _checks.tensor("vocab_order", vocab_order, dtypes=_checks.INT_DTYPES, shape=(V,))
    order = vocab_order.to(device=weight.device, dtype=torch.long)
    if not torch.equal(torch.sort(order).values, torch.arange(V, device=order.device)):
        raise ValueError("vocab_order must be a permutation of range(V)")
    return order


# --------------------------------------------------------------------------- chunk loops
def _chunk_loop(hidden, weight, bias, targets, tok, opt, inv_norm, rows, triton_path, grads,
                has_loss, need_entropy=True):
    """Run every token chunk (dense path): per-token results (N,) and, when asked, the gradients.

    grads = (grad_hidden?, grad_weight?, grad_bias?).  Returns (results dict, gh, gw, gb).
    """
    N, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    cd = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    need_h, need_w, need_b = grads
    write_grad = has_loss and (need_h or need_w or need_b)
    keys = ("logp",) + (("entropy",) if has_loss or need_entropy else ())
    keys += ("tok_loss", "kl", "clipped") if has_loss else ()
    out = {k: torch.empty(N, dtype=cd, device=dev) for k in keys}
    gh = torch.empty_like(hidden) if need_h else None
    acc_fp32 = need_w and weight.dtype in _HALF and N > rows
    gw = None
    if need_w:
        make = torch.zeros if N == 0 else torch.empty          # the first product writes it
        gw = make(V, H, dtype=torch.float32 if acc_fp32 else weight.dtype, device=dev)
    strategy = _acc_strategy(dev, weight.dtype) if acc_fp32 else None
    gb = torch.zeros(V, dtype=cd, device=dev) if need_b else None
    buf = torch.empty(min(rows, N), V, dtype=hidden.dtype, device=dev)
    wt = weight.t()
    core = _core_triton if triton_path else _core_torch
    for ci, s in enumerate(range(0, N, rows)):
        e = min(N, s + rows)
        h_c, logits = hidden[s:e], buf[: e - s]
        if bias is None:
            torch.mm(h_c, wt, out=logits)
        else:
            torch.addmm(bias, h_c, wt, out=logits)
        tok_c = {k: v[s:e] for k, v in tok.items()}
        res = core(logits, targets[s:e], tok_c, opt, inv_norm, write_grad, has_loss, need_entropy)
        for k in keys:
            out[k][s:e] = res[k]
        if not write_grad:
            continue
        if need_h:
            torch.mm(logits, weight, out=gh[s:e])
        if need_w:
            # rows outside the loss: their dlogits are 0, and their hidden rows must not reach the
            # product either (0 * NaN = NaN)
            h_w = torch.where(tok_c["mask"][:, None], h_c, torch.zeros((), dtype=h_c.dtype, device=dev))
            if acc_fp32:
                _add_product_(gw, logits.t(), h_w, ci == 0, strategy)
            elif ci == 0:
                torch.mm(logits.t(), h_w, out=gw)
            else:
                gw.addmm_(logits.t(), h_w)
        if need_b:
            gb.add_(logits.sum(0, dtype=cd))
    del buf
    if need_w and gw.dtype != weight.dtype:
        gw = gw.to(weight.dtype)
    if need_b:
        gb = gb.to(bias.dtype)
    return out, gh, gw, gb


def _to_dtype_rows(acc: torch.Tensor, dtype: torch.dtype, order: Optional[torch.Tensor], step: int = 16384):
    """``acc`` (V, ...) float32 in the permuted order -> ``dtype`` in the original order, a few
    rows at a time (no second full-size temporary)."""
    if order is None:
        return acc if acc.dtype == dtype else acc.to(dtype)
    out = torch.empty(acc.shape, dtype=dtype, device=acc.device)
    for s in range(0, acc.shape[0], step):
        out.index_copy_(0, order[s:s + step], acc[s:s + step].to(dtype))
    return out


def _chunk_loop_filtered(hidden, weight, bias, targets, tok, opt, inv_norm, rows, triton_path, grads, filt):
    """The gradient-filtered chunk loop (same per-token results as :func:`_chunk_loop`)."""
    N, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    cd = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    need_h, need_w, need_b = grads
    write_grad = need_h or need_w or need_b
    keys = ("logp", "entropy", "tok_loss", "kl", "clipped")
    out = {k: torch.empty(N, dtype=cd, device=dev) for k in keys}
    order = filt.order
    if order is not None:
        inv = torch.empty_like(order)
        inv[order] = torch.arange(V, device=dev)
        w_p = weight.index_select(0, order)
        b_p = None if bias is None else bias.index_select(0, order)
        y_p = inv[targets]
    else:
        w_p, b_p, y_p = weight, bias, targets
    gh = torch.empty_like(hidden) if need_h else None
    acc_dtype = torch.float32 if weight.dtype in _HALF else weight.dtype
    gw_acc = torch.zeros(V, H, dtype=acc_dtype, device=dev) if need_w else None
    gb_acc = torch.zeros(V, dtype=cd, device=dev) if need_b else None
    unit = filt.tiles["dh"][1]
    inv_t = 1.0 / opt.temperature
    stats = {"kept_dh": 0, "tiles_dh": 0, "kept_dw": 0, "tiles_dw": 0, "dropped_dh": 0.0, "dropped_dw": 0.0,
             "row_scale": 0.0, "dense_chunks": 0, "chunks": 0}
    buf = torch.empty(min(rows, N), V, dtype=hidden.dtype, device=dev)
    wt = w_p.t()
    core = _core_triton if triton_path else _core_torch
    for s in range(0, N, rows):
        e = min(N, s + rows)
        h_c, logits = hidden[s:e], buf[: e - s]
        if b_p is None:
            torch.mm(h_c, wt, out=logits)
        else:
            torch.addmm(b_p, h_c, wt, out=logits)
        tok_c = {k: v[s:e] for k, v in tok.items()}
        res = core(logits, y_p[s:e], tok_c, opt, inv_norm, False, True, True, stats_unit=unit)
        for k in keys:
            out[k][s:e] = res[k]
        if not write_grad:
            continue
        plan = _filter_plan(res, e - s, V, filt, inv_t)
        mask_c = tok_c["mask"]
        h_w = torch.where(mask_c[:, None], h_c, torch.zeros((), dtype=h_c.dtype, device=dev))
        _filtered_products(logits, res, plan, h_w, w_p, y_p[s:e], mask_c, None if gh is None else gh[s:e],
                           gw_acc, gb_acc, filt, inv_t, triton_path)
        stats["dense_chunks"] += plan["dense"]
        stats["chunks"] += 1
        if filt.stats is not None:
            stats["kept_dh"] = stats["kept_dh"] + plan["dh"].sum()
            stats["kept_dw"] = stats["kept_dw"] + plan["dw"].sum()
            stats["tiles_dh"] += plan["tiles_dh"]
            stats["tiles_dw"] += plan["tiles_dw"]
            for k in ("dropped_dh", "dropped_dw", "row_scale"):
                stats[k] = stats[k] + plan[k]
    del buf, w_p
    gw = _to_dtype_rows(gw_acc, weight.dtype, order) if need_w else None
    del gw_acc
    gb = _to_dtype_rows(gb_acc, bias.dtype, order) if need_b else None
    if filt.stats is not None and write_grad:
        f = lambda x: torch.as_tensor(x, dtype=torch.float64, device=dev)
        filt.stats.update(
            skipped_dh=1.0 - f(stats["kept_dh"]) / max(stats["tiles_dh"], 1),
            skipped_dw=1.0 - f(stats["kept_dw"]) / max(stats["tiles_dw"], 1),
            tiles_dh=stats["tiles_dh"], tiles_dw=stats["tiles_dw"],
            dropped_l1_bound_dh=f(stats["dropped_dh"]), dropped_l1_bound_dw=f(stats["dropped_dw"]),
            row_scale_l1=f(stats["row_scale"]), threshold=filt.threshold, vocab_ordered=order is not None,
            tiles=dict(filt.tiles), dense_chunks=stats["dense_chunks"], chunks=stats["chunks"],
            dense_above=filt.dense_above)
        filt.stats["skipped_fraction"] = 0.5 * (filt.stats["skipped_dh"] + filt.stats["skipped_dw"])
    return out, gh, gw, gb


class _FusedLinearPGLoss(torch.autograd.Function):
    """Forward computes the loss *and* the gradients; backward scales them by grad_output."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, tok, opt, inv_norm, count, rows, triton_path, grads, filt):
        if filt is None:
            out, gh, gw, gb = _chunk_loop(hidden, weight, bias, targets, tok, opt, inv_norm, rows,
                                          triton_path, grads, has_loss=True)
        else:
            out, gh, gw, gb = _chunk_loop_filtered(hidden, weight, bias, targets, tok, opt, inv_norm, rows,
                                                   triton_path, grads, filt)
        loss = out["tok_loss"].sum() * inv_norm
        clip_frac = out["clipped"].sum() / count.clamp(min=1.0)
        ctx.save_for_backward(gh, gw, gb)
        ctx.mark_non_differentiable(out["logp"], out["entropy"], out["kl"], clip_frac)
        return loss, out["logp"], out["entropy"], out["kl"], clip_frac

    @staticmethod
    def backward(ctx, grad_loss, *_unused):
        grads = ctx.saved_tensors
        # on CPU a unit grad_output (the usual loss.backward()) is checked for free and spares a
        # pass over the weight-sized gradient; on CUDA that check would cost a device sync
        if not (grad_loss.device.type == "cpu" and bool(grad_loss == 1)):
            grads = tuple(None if g is None else g * grad_loss.to(g.dtype) for g in grads)
        return tuple(grads) + (None,) * 9


# --------------------------------------------------------------------------- public API
def fused_linear_pg_loss(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, old_logp: Optional[torch.Tensor],
    advantages: torch.Tensor, loss_mask: torch.Tensor, *,
    bias: Optional[torch.Tensor] = None, ref_logp: Optional[torch.Tensor] = None,
    rollout_logp: Optional[torch.Tensor] = None, eps_low: float = 0.2, eps_high: float = 0.2,
    dual_clip: Optional[float] = None, beta: float = 0.0, kl_clamp: float = 10.0,
    entropy_coef: float = 0.0, tis_cap: Optional[float] = None, temperature: float = 1.0,
    normalizer: Union[None, float, torch.Tensor] = None, weights: Optional[torch.Tensor] = None,
    chunk_size: Optional[int] = None, memory_budget: Optional[int] = None, backward: str = "dense",
    filter_threshold: float = 2.0 ** -12, vocab_order: Union[None, str, torch.Tensor] = "mean_logit",
    filter_stats: Optional[dict] = None, filter_dense_above: float = 0.75, backend: str = "auto",
) -> PGLossOutput:
    """docs/algorithm.md §4 clipped policy-gradient loss through the LM head, without (N, V) logits.

    hidden (N, H) and weight (V, H) (and bias (V,)): one dtype among bfloat16, float16,
    float32 (float64 with backend="torch").  targets (N,) integer ids in [0, V).
    old_logp, advantages, ref_logp, rollout_logp: (N,) float; ``old_logp=None`` means
    on-policy (pi_old = pi, detached: rho = 1 with its gradient), which spares the forward-only
    log-prob pass a caller would otherwise run first.  loss_mask (N,): nonzero marks
    the tokens in the loss; the others contribute nothing (their per-token inputs and hidden
    rows are ignored by the loss and the gradients, even when NaN).

    Per masked token: logits = (h W^T + b) / temperature, logp = log_softmax(logits)[target],
    rho = exp(logp - old_logp), pg = -min(rho A, clip(rho, 1-eps_low, 1+eps_high) A); with
    dual_clip c, pg = min(pg, -c A) where A < 0; with tis_cap C, pg *= min(exp(old_logp -
    rollout_logp), C) (constant); kl = clamp(exp(d) - d - 1, max=kl_clamp), d = ref_logp - logp;
    objective = pg + beta kl - entropy_coef entropy.
    loss = sum over masked tokens of weights * objective / normalizer (default normalizer: the
    masked-token count; loss 0 if no token is masked; a given normalizer must be finite and
    > 0).  weights (N,) float, optional (default 1): a per-token multiplier, e.g.
    1/len(sequence) with normalizer = number of sequences for a sequence-mean of token-means;
    it scales neither ``kl`` nor ``clip_frac``.  Non-finite inputs: see the module docstring
    (a NaN reaching a masked token makes the loss and the gradients NaN).

    Returns ``PGLossOutput(loss, logp, entropy, kl, clip_frac)``: per-token outputs are (N,)
    float32 (float64 for float64 inputs); only ``loss`` is differentiable (w.r.t. hidden,
    weight and bias).

    chunk_size: token rows per chunk (None: from ``memory_budget`` bytes on CUDA, default
    :data:`MEMORY_BUDGET`; about N*H/V rows, >= 256, on CPU unless a budget is given).
    backward: "dense" (default) or "filtered" (skips the tiles of d loss / d logits whose
    entries are all <= ``filter_threshold`` * (|d loss/d logp| + |d loss/d entropy|) / T, with
    the error bound of the module docstring; ``vocab_order`` "mean_logit" (default), None or a
    permutation of range(V) sets the vocabulary order the tiles follow; ``filter_stats``, a dict,
    receives the skipped fractions of both products (0-dim tensors), the tile counts, the
    dropped-mass bounds and ``dense_chunks`` / ``chunks``).  ``filter_dense_above``: a chunk
    whose kept share of tiles (both products) exceeds it runs the dense products instead of the
    block-sparse ones (the sparse sweep costs more than it saves there; exact, nothing dropped
    in that chunk; one host sync per chunk to decide); 1 = never.
    backend: "auto" (Triton on CUDA, PyTorch on CPU), "triton", "torch" (the chunked PyTorch
    path) or "reference" (:func:`tspo_kernels.reference.pg_loss_reference`: builds the (N, V)
    logits; for tests and small inputs).
    """
    N, H, V = _check_head(hidden, weight, targets, bias)
    per_token = dict(old_logp=old_logp, advantages=advantages, ref_logp=ref_logp,
                     rollout_logp=rollout_logp, weights=weights)
    _check_token_inputs(N, loss_mask=loss_mask, **per_token)
    dev = _checks.same_device(hidden=hidden, weight=weight, targets=targets, bias=bias,
                              loss_mask=loss_mask, **per_token)
    triton_path = _resolve_backend(backend, dev, hidden.dtype)
    opt = _options(eps_low, eps_high, dual_clip, beta, kl_clamp, entropy_coef, tis_cap,
                   temperature, ref_logp, rollout_logp)
    _checks.choice("backward", backward, BACKWARDS)
    threshold = _number("filter_threshold", filter_threshold, low=0.0, strict=False)
    dense_above = _number("filter_dense_above", filter_dense_above, low=0.0, strict=False)
    if dense_above > 1.0:
        raise ValueError(f"filter_dense_above must be in [0, 1] (1 = never dense), got {filter_dense_above}")
    budget = _budget(memory_budget)
    cd = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    if backend == "reference":          # the plain math: (N, V) logits, autograd
        if backward != "dense":
            raise ValueError("backward='filtered' runs on backend 'triton' or 'torch'; 'reference' is the exact "
                             "dense math")
        _check_targets_range(targets, V)
        _check_normalizer(normalizer)
        res = reference.pg_loss_reference(
            hidden, weight, targets, old_logp, advantages, loss_mask, bias=bias, ref_logp=ref_logp,
            rollout_logp=rollout_logp, eps_low=eps_low, eps_high=eps_high, dual_clip=dual_clip, beta=beta,
            kl_clamp=kl_clamp, entropy_coef=entropy_coef, tis_cap=tis_cap, temperature=temperature,
            normalizer=normalizer, weights=weights)
        return PGLossOutput(res.loss, *(x.to(cd) for x in res[1:]))
    tok = _token_inputs(cd, loss_mask, **per_token)
    _check_targets_range(targets, V)
    inv_norm, count = _inv_norm(normalizer, tok["mask"], cd, dev)
    on = torch.is_grad_enabled()
    grads = (on and hidden.requires_grad, on and weight.requires_grad,
             on and bias is not None and bias.requires_grad)
    hidden_c, weight_c = hidden.contiguous(), weight.contiguous()
    bias_c = None if bias is None else bias.contiguous()
    elem = hidden.element_size()
    filt = None
    extra_fixed = extra_per_row = 0
    if backward == "filtered":
        tiles = {k: tuple(v) for k, v in FILTER_TILES.items()}
        _check_tiles(tiles)
        order = _vocab_permutation(vocab_order, hidden_c.detach(), weight_c.detach(), bias_c, tok["mask"])
        filt = _Filter(threshold=threshold, order=order, tiles=tiles, block_h=FILTER_BLOCK_H, stats=filter_stats,
                       dense_above=dense_above)
        extra_fixed = V * H * elem if order is not None else 0                  # the permuted weight copy
        extra_per_row = triton.cdiv(V, tiles["dh"][1]) * 8 + H * elem          # unit maxima and masks, h rows
    rows = _chunk_rows(chunk_size, N, H, V, device=dev, elem=elem, torch_path=not triton_path, need_h=grads[0],
                       need_w=grads[1], weight_half=weight.dtype in _HALF,
                       extra_fixed=extra_fixed, extra_per_row=extra_per_row, budget=budget)
    out = _FusedLinearPGLoss.apply(hidden_c, weight_c, bias_c, targets.long().contiguous(), tok,
                                   opt, inv_norm, count, rows, triton_path, grads, filt)
    return PGLossOutput(*out)


def fused_linear_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
    bias: Optional[torch.Tensor] = None, temperature: float = 1.0, return_entropy: bool = False,
    chunk_size: Optional[int] = None, memory_budget: Optional[int] = None, backend: str = "auto",
):
    """Forward-only log pi(targets) through the LM head (for pi_old and pi_ref), no grad.

    hidden (N, H), weight (V, H), bias (V,) in one float dtype; targets (N,) ids in [0, V).
    Returns logp (N,) float32 (float64 for float64 inputs), and entropy (N,) when
    ``return_entropy``.  No (N, V) tensor is built: per chunk one product and one read sweep
    of the logits (the chunk from ``memory_budget`` on CUDA, as for the loss; no gradient
    buffers, so chunks are larger).  A NaN in a row's inputs gives that row NaN.
    """
    N, H, V = _check_head(hidden, weight, targets, bias)
    dev = _checks.same_device(hidden=hidden, weight=weight, targets=targets, bias=bias)
    triton_path = _resolve_backend(backend, dev, hidden.dtype)
    opt = _options(0.2, 0.2, None, 0.0, 10.0, 0.0, None, temperature, None, None)
    _check_targets_range(targets, V)
    budget = _budget(memory_budget)
    if backend == "reference":
        cd = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        with torch.no_grad():
            res = reference.logprobs_reference(hidden, weight, targets, bias=bias, temperature=temperature,
                                               return_entropy=return_entropy)
        return tuple(x.to(cd) for x in res) if return_entropy else res.to(cd)
    rows = _chunk_rows(chunk_size, N, H, V, device=dev, elem=hidden.element_size(), torch_path=not triton_path,
                       budget=budget)
    with torch.no_grad():
        out, *_ = _chunk_loop(hidden.detach().contiguous(), weight.detach().contiguous(),
                              None if bias is None else bias.detach().contiguous(),
                              targets.long().contiguous(), {}, opt, None, rows, triton_path,
                              (False, False, False), has_loss=False, need_entropy=return_entropy)
    return (out["logp"], out["entropy"]) if return_entropy else out["logp"]
