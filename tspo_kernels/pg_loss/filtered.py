"""K3's gradient-filtered products (``backward="filtered"``): the tile plan, its error bound, the
block-sparse Triton kernels and the product step of the chunk loop.

Most of a trained policy's softmax mass sits on few tokens, so most entries of d loss / d logits
are far below what a 16-bit product resolves.  Write d loss / d z_tv = g_lp [v = y_t] + S_tv with
the *soft part* S_tv = -p_tv (g_lp + g_ent (z_tv - E_t[z])) (z = logits / T, g_lp = d loss / d
log pi, g_ent = d loss / d entropy of row t, s_t = |g_lp,t| + |g_ent,t|).  The row sweep stores,
per row and vocabulary unit u of ``UNIT`` columns, the largest z of the unit, M_tu, and its
log-sum-exp, Z_tu; from them

    U_tu = |g_lp| e^(M_tu - lse_t) + |g_ent| F(M_tu),
    F(M) = max(e^(M - lse)(M - E)^+, e^(z* - lse)(E - z*)),  z* = min(M, E - 1)

bounds |S_tv| for every v of unit u (p_v <= e^(M - lse); p_v |z_v - E| <= sup_{z <= M}
e^(z - lse)|z - E|, which F is: e^(z-lse)(z-E) grows for z >= E, e^(z-lse)(E-z) peaks at
z = E - 1), and

    A_tu = |g_lp| e^(Z_tu - lse_t) + |g_ent| |u| F(M_tu)

bounds sum_{v in u} |S_tv| (e^(Z - lse) is the unit's probability mass, exactly; |u| its width).
The mass term matters: on LM-like inputs the unit-maximum bound |u| e^(M - lse) overstates a
row's dropped mass about 60-fold (bench/RESULTS.md).

**Which units a row may drop** (:func:`keep_units`).  Two rules, with tau = ``threshold`` and
rho = ``row_bound``:

1. *per entry*: unit u of row t may be dropped only if U_tu <= tau_t s_t, with tau_t <= tau;
2. *per row*: the row's dropped units together satisfy  sum_{dropped u} A_tu <= rho s_t.
   A row whose probability mass is spread wide (a high-entropy row: thousands of tokens each
   below tau) would otherwise lose its whole soft gradient, a coherent bias, not noise; instead
   its threshold is lowered, tau_t = tau 2^-k with the smallest k <= ``ROW_LEVELS`` that meets
   the bound (beyond it the row keeps every unit whose bound is not 0).  The levels come from one
   log2 bucketing of U_tu / (tau s_t) per row, so the decision and its accounting agree exactly.

A tile of (rows x units) is *skipped* by a product when every row in it drops every unit of it.
The target term g_lp [v = y] is never dropped (it is added exactly, as a row gather / scatter).

**Error bound.**  For each product and each token row t, with D_t the entries of row t in skipped
tiles (a subset of the units row t dropped) and delta_tv the entries left out:

    |delta_tv| <= tau (|g_lp,t| + |g_ent,t|) / T                        (each entry)
    sum_{v in D_t} |delta_tv| <= rho (|g_lp,t| + |g_ent,t|) / T        (the row's total)

so |err grad_h[t, j]| <= max_v |W_vj| rho s_t / T and |err grad_W[v, j]| <= sum_t |h_tj| |delta_tv|
<= max_t |h_tj| sum_t |delta_tv|.  (A unit's mass below e^-87 of the row's running maximum
underflows to 0 in float32: such terms are below what float32 resolves.)  With
``collect_stats``, ``dropped_l1_bound_dh`` / ``_dw`` report the sum of A / T over the skipped
(row, unit) entries of each product, an upper bound on its sum |delta|, and ``rows_lowered`` the
rows the row rule gave a lower threshold.

**Products.**  Only kept tiles are written by the filtered sweep 2 (``_soft_grad_kernel``) and
multiplied: block-sparse products over lists of kept tiles, one for grad_hidden (tiles of
``tiles_dh``; ``_filtered_dh_kernel``) and one for grad_weight (``tiles_dw``;
``_filtered_dw_kernel``, two kept row blocks per iteration so that each tensor-core product is
64 token rows deep).  A chunk whose kept share of tiles (both products) exceeds ``dense_above`` runs
sweep 2 over the whole chunk and the dense products instead (exact for that chunk).  With a
vocabulary order (``mean_logit``) the products run on a permuted copy of W, which clusters the
mass into fewer tiles; gradients come back in the original order.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .. import _checks
from .._checks import INTERPRET
from .gemm import add_product_
from .options import HALF, FilterOptions, FilterStats
from .rows import row_launch

__all__ = ["ROW_LEVELS", "VOCAB_ORDERS", "FilteredStep", "check_tiles", "filter_plan", "filtered_launch",
           "keep_units", "vocab_permutation"]

#: how many times the row bound may halve a row's threshold before the row keeps every unit
ROW_LEVELS = 12
VOCAB_ORDERS = ("mean_logit",)


# --------------------------------------------------------------------------- Triton kernels
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
    i = tl.program_id(0).to(tl.int64)
    rows = i * BM + tl.arange(0, BM)
    rin = rows < C
    hcol = tl.program_id(1) * BH + tl.arange(0, BH)
    hin = hcol < H
    acc = tl.zeros((BM, BH), tl.float32)
    n = tl.load(cnt_ptr + i)
    for jj in range(0, n):
        u = tl.load(idx_ptr + i * idx_stride + jj).to(tl.int64)
        cols = u * BN + tl.arange(0, BN)
        cin = cols < V
        a = tl.load(dl_ptr + rows[:, None] * s_dl + cols[None, :], mask=rin[:, None] & cin[None, :], other=0.0)
        w = tl.load(w_ptr + cols[:, None] * s_w + hcol[None, :], mask=cin[:, None] & hin[None, :], other=0.0)
        if DOT_F32:
            acc = tl.dot(a.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w, acc)
    y = tl.load(y_ptr + rows, mask=rin, other=0).to(tl.int64)
    c = tl.load(coef_ptr + rows, mask=rin, other=0.0)
    wy = tl.load(w_ptr + y[:, None] * s_w + hcol[None, :], mask=rin[:, None] & hin[None, :], other=0.0)
    acc += c[:, None] * wy.to(tl.float32)
    tl.store(gh_ptr + rows[:, None] * s_gh + hcol[None, :], acc.to(gh_ptr.dtype.element_ty),
             mask=rin[:, None] & hin[None, :])


@triton.jit
def _filtered_dw_kernel(dl_ptr, s_dl, h_ptr, s_h, idx_ptr, idx_stride, cnt_ptr, gw_ptr, s_gw, gb_ptr,
                        C, V, H, BM: tl.constexpr, BN: tl.constexpr, BH: tl.constexpr, BLOCKS: tl.constexpr,
                        HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr):
    """grad_weight of BN vocabulary rows x BH hidden columns, added into the float32 accumulator:
    sum over the token blocks (BM rows) that keep this tile of dlogits[block, tile]^T @ h[block,
    cols] (and, with HAS_BIAS, the column sums into grad_bias).  BLOCKS kept blocks go into one
    product per iteration (BLOCKS x BM token rows: the tensor-core product's depth), gathered by
    row index; a missing last block is masked.

    Grid (hidden blocks, vocabulary tiles): the hidden block varies fastest, so the programs of
    one vocabulary tile run side by side and read its dlogits tiles once from DRAM (then L2);
    the other way round every tile would be read once per hidden block."""
    u = tl.program_id(1).to(tl.int64)
    n = tl.load(cnt_ptr + u)
    if n > 0:
        cols = u * BN + tl.arange(0, BN)
        cin = cols < V
        hcol = tl.program_id(0) * BH + tl.arange(0, BH)
        hin = hcol < H
        r = tl.arange(0, BLOCKS * BM)
        part = r // BM                                   # which of the iteration's kept blocks
        within = (r % BM).to(tl.int64)
        lst = idx_ptr + u * idx_stride
        acc = tl.zeros((BN, BH), tl.float32)
        csum = tl.zeros((BN,), tl.float32)
        for jj in range(0, n, BLOCKS):
            have = jj + part < n
            blk = tl.load(lst + jj + part, mask=have, other=0).to(tl.int64)
            rows = blk * BM + within
            rin = have & (rows < C)
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


def filtered_launch(H: int, block_h: int, f32: bool, *, interpret: bool = INTERPRET) -> dict:
    """Launch settings of the block-sparse products (``f32``: float32 operands, multiplied
    exactly, without tensor cores): hidden columns per program ``BH``, warps, and ``BLOCKS``, the
    kept row blocks ``_filtered_dw_kernel`` multiplies per iteration: two for 16-bit operands (a
    64-row-deep tensor-core product), one for float32, where ptxas spills a two-block FMA product
    to local memory on sm_90.  The compile check builds every configuration this returns."""
    bh = min(block_h, max(16, triton.next_power_of_2(H)))
    return dict(BH=bh, num_warps=4 if interpret or bh < 128 else 8, BLOCKS=1 if f32 and not interpret else 2)


# --------------------------------------------------------------------------- the plan
def check_tiles(tiles_dh: Tuple[int, int], tiles_dw: Tuple[int, int]) -> None:
    (bm2, bn2), (bm3, bn3) = tiles_dh, tiles_dw
    for v in (bm2, bn2, bm3, bn3):
        if v < 16 or v & (v - 1):
            raise ValueError(f"filter tiles must be powers of two >= 16, got dh {tiles_dh}, dw {tiles_dw}")
    if bm2 % bm3 or bn3 % bn2:
        raise ValueError(f"filter tiles: dh rows must be a multiple of dw rows and dw columns a multiple of "
                         f"dh columns, got dh {tiles_dh}, dw {tiles_dw}")


def keep_units(U: torch.Tensor, A: torch.Tensor, s: torch.Tensor, threshold: float,
               row_bound: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(C, units) mask of the units each row keeps, and each row's level k (its threshold is
    ``threshold`` 2^-k; ``ROW_LEVELS + 1``: only units with U = 0 dropped), by the two rules of
    the module docstring.  ``U`` (C, units): the bound on each entry's |soft part| in the unit;
    ``A`` (C, units): the bound on the unit's sum of them; ``s`` (C,): |g_lp| + |g_ent|.  NaN
    rows keep everything (their NaN must reach the gradients)."""
    C = U.shape[0]
    zero = torch.zeros((), dtype=U.dtype, device=U.device)
    ts = threshold * s[:, None]
    droppable = U <= ts                                    # rule 1 at the top level (False for NaN)
    # bucket of a droppable unit: the largest k <= ROW_LEVELS with U <= threshold 2^-k s
    # (ROW_LEVELS + 1 for U = 0); bucket -1: not droppable at any level
    k = torch.floor(torch.log2(ts / U)).clamp_(0.0, float(ROW_LEVELS))
    k = torch.where(U > 0, k, torch.full((), ROW_LEVELS + 1.0, dtype=U.dtype, device=U.device))
    k = torch.where(droppable, k, torch.full((), -1.0, dtype=U.dtype, device=U.device))
    buckets = torch.zeros(C, ROW_LEVELS + 3, dtype=U.dtype, device=U.device)
    buckets.scatter_add_(1, (k + 1).long(), torch.where(droppable, A, zero))
    # rule 2: the bound on what a row drops at level l (its buckets >= l), l = 0 .. ROW_LEVELS + 1
    dropped = buckets.flip(1).cumsum(1).flip(1)[:, 1:]
    fits = dropped <= row_bound * s[:, None]
    fits[:, -1] = True                                     # only units with U = 0 dropped: exact
    level = fits.to(torch.int8).argmax(1)                  # the first level that fits
    return k < level[:, None].to(k.dtype), level


def filter_plan(res: dict, C: int, V: int, filt: FilterOptions, inv_t: float) -> dict:
    """Which tiles each filtered product keeps in one chunk, from the row sweep's unit maxima
    (PyTorch ops): ``dh`` (row blocks x units), ``dw`` (row units x dw columns), ``write`` (the
    union, at row-unit x unit granularity), ``dense`` (every tile kept: dense products), and with
    ``filt.collect_stats`` the chunk's contribution to :class:`FilterStats`."""
    (bm2, unit), (r0, bn3) = filt.tiles_dh, filt.tiles_dw
    m2, k3 = bm2 // r0, bn3 // unit
    zmax, lse, ez = res["zmax"], res["lse"][:, None], res["ez"][:, None]
    a, c = res["g_lp"].abs(), res["g_ent"].abs()
    s = a + c
    P = torch.exp(zmax - lse)
    zs = torch.minimum(zmax, ez - 1.0)
    F = torch.maximum(P * (zmax - ez).clamp(min=0.0), torch.exp(zs - lse) * (ez - zs))
    U = a[:, None] * P + c[:, None] * F                  # >= |soft part| of every entry of the unit
    nU = U.shape[1]
    width = torch.full((nU,), float(unit), dtype=U.dtype, device=U.device)
    width[-1] = float(V - (nU - 1) * unit)
    A = a[:, None] * torch.exp(res["zlse"] - lse) + c[:, None] * (width * F)   # >= the unit's sum of them
    active = s != 0                                      # NaN rows are active: their NaN must spread
    keep, level = keep_units(U, A, s, filt.threshold, filt.row_bound)
    keep = active[:, None] & keep
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
    if filt.collect_stats:
        zero = torch.zeros((), dtype=U.dtype, device=U.device)
        Ae = torch.where(active[:, None], A, zero)
        drop_dh = ~dh.repeat_interleave(bm2, 0)[:C, :nU]
        drop_dw = ~dw.repeat_interleave(r0, 0).repeat_interleave(k3, 1)[:C, :nU]
        plan["dropped_dh"] = (Ae * drop_dh).sum() * inv_t
        plan["dropped_dw"] = (Ae * drop_dw).sum() * inv_t
        plan["row_scale"] = torch.where(active, s, torch.zeros((), dtype=s.dtype, device=s.device)).sum() * inv_t
        plan["rows_lowered"] = (active & (level > 0)).sum()
        plan["tiles_dh"], plan["tiles_dw"] = tiles_dh, tiles_dw
    return plan


def kept_lists(mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``mask``: the indices of its True columns first (stable), and their count."""
    idx = torch.argsort((~mask).to(torch.int8), dim=1, stable=True).to(torch.int32).contiguous()
    return idx, mask.sum(1, dtype=torch.int32).contiguous()


def _expand(mask: torch.Tensor, rows: int, cols: int, C: int, V: int) -> torch.Tensor:
    return mask.repeat_interleave(rows, 0).repeat_interleave(cols, 1)[:C, :V]


def vocab_permutation(vocab_order, hidden, weight, bias, mask) -> Optional[torch.Tensor]:
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


# --------------------------------------------------------------------------- products of one chunk
def _dense_products(dh, dw, coef, w_p, y_p, h_w, gh_c, gw_acc, gb_acc, acc_strategy: str) -> None:
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
            add_product_(gw_acc, dw.t(), h_w, first=False, strategy=acc_strategy)
    if gb_acc is not None:
        gb_acc.add_(dw.sum(0, dtype=gb_acc.dtype))


def _target_term(coef, h_w, y_p, gw_acc, gb_acc) -> None:
    """The target term of grad_weight / grad_bias, exactly: coef h_t scattered onto row y_t."""
    if gw_acc is not None:
        gw_acc.index_add_(0, y_p, (coef[:, None] * h_w.to(coef.dtype)).to(gw_acc.dtype))
    if gb_acc is not None:
        gb_acc.index_add_(0, y_p, coef.to(gb_acc.dtype))


def _to_dtype_rows(acc: torch.Tensor, dtype: torch.dtype, order: Optional[torch.Tensor], step: int = 16384):
    """``acc`` (V, ...) float32 in the permuted order -> ``dtype`` in the original order, a few
    rows at a time (no second full-size temporary)."""
    if order is None:
        return acc if acc.dtype == dtype else acc.to(dtype)
    out = torch.empty(acc.shape, dtype=dtype, device=acc.device)
    for s in range(0, acc.shape[0], step):
        out.index_copy_(0, order[s:s + step], acc[s:s + step].to(dtype))
    return out


class FilteredStep:
    """The product step of ``backward="filtered"`` in the chunk loop (``chunks.chunk_loop``):
    the logits are computed with the permuted head; per chunk the tile plan, the filtered sweep 2
    and the block-sparse (or, above ``dense_above``, dense) products, and the exact target term;
    at the end the float32 accumulators in the original vocabulary order and :attr:`stats`."""

    write_grad = False                   # the row sweep keeps the logits: sweep 2 is filtered here

    def __init__(self, hidden, weight, bias, targets, grads, filt: FilterOptions, *, inv_temp: float,
                 triton_path: bool, acc_strategy: str):
        N, H = hidden.shape
        V = weight.shape[0]
        self.device = dev = hidden.device
        need_h, need_w, need_b = grads
        self.filt, self.inv_temp, self.triton_path, self.acc_strategy = filt, inv_temp, triton_path, acc_strategy
        self.stats_unit = filt.unit
        self.order = order = filt.order
        if order is not None:
            inv = torch.empty_like(order)
            inv[order] = torch.arange(V, device=dev)
            self.head = (weight.index_select(0, order), None if bias is None else bias.index_select(0, order),
                         inv[targets])
        else:
            self.head = (weight, bias, targets)
        self.weight_dtype, self.bias_dtype = weight.dtype, None if bias is None else bias.dtype
        cd = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        self.gh = torch.empty_like(hidden) if need_h else None
        acc_dtype = torch.float32 if weight.dtype in HALF else weight.dtype
        self.gw_acc = torch.zeros(V, H, dtype=acc_dtype, device=dev) if need_w else None
        self.gb_acc = torch.zeros(V, dtype=cd, device=dev) if need_b else None
        self.totals = {"kept_dh": 0, "tiles_dh": 0, "kept_dw": 0, "tiles_dw": 0, "dropped_dh": 0.0,
                       "dropped_dw": 0.0, "row_scale": 0.0, "rows_lowered": 0, "dense_chunks": 0, "chunks": 0}
        self.stats: Optional[FilterStats] = None

    def chunk(self, s: int, e: int, h_c, logits, res: dict, tok_c: dict) -> None:
        C, V = logits.shape
        filt, inv_t = self.filt, self.inv_temp
        w_p, _, y_all = self.head
        y_p = y_all[s:e]
        plan = filter_plan(res, C, V, filt, inv_t)
        mask = tok_c["mask"]
        h_w = torch.where(mask[:, None], h_c, torch.zeros((), dtype=h_c.dtype, device=h_c.device))
        gh_c = None if self.gh is None else self.gh[s:e]
        coef = res["g_lp"] * inv_t                            # the target term's coefficient
        gw_acc, gb_acc = self.gw_acc, self.gb_acc
        if self.triton_path:
            self._triton_products(logits, res, plan, h_w, w_p, y_p, mask, gh_c, coef, inv_t)
        else:
            cd = res["lse"].dtype
            z = logits.to(cd) * inv_t
            p = torch.exp(z - res["lse"][:, None])
            soft = -p * (res["g_lp"][:, None] + res["g_ent"][:, None] * (z - res["ez"][:, None])) * inv_t
            soft = torch.where(mask[:, None], soft, torch.zeros((), dtype=cd, device=soft.device))
            if plan["dense"]:
                dl = soft.to(logits.dtype)
                _dense_products(dl, dl, coef, w_p, y_p, h_w, gh_c, gw_acc, gb_acc, self.acc_strategy)
            else:
                (bm2, unit), (r0, bn3) = filt.tiles_dh, filt.tiles_dw
                zero = torch.zeros((), dtype=cd, device=soft.device)
                dh = torch.where(_expand(plan["dh"], bm2, unit, C, V), soft, zero).to(logits.dtype)
                dw = torch.where(_expand(plan["dw"], r0, bn3, C, V), soft, zero).to(logits.dtype)
                _dense_products(dh, dw, coef, w_p, y_p, h_w, gh_c, gw_acc, gb_acc, self.acc_strategy)
        _target_term(coef, h_w, y_p, gw_acc, gb_acc)
        t = self.totals
        t["dense_chunks"] += plan["dense"]
        t["chunks"] += 1
        if filt.collect_stats:
            t["kept_dh"] = t["kept_dh"] + plan["dh"].sum()
            t["kept_dw"] = t["kept_dw"] + plan["dw"].sum()
            t["tiles_dh"] += plan["tiles_dh"]
            t["tiles_dw"] += plan["tiles_dw"]
            for k in ("dropped_dh", "dropped_dw", "row_scale", "rows_lowered"):
                t[k] = t[k] + plan[k]

    def _triton_products(self, logits, res, plan, h_w, w_p, y_p, mask, gh_c, coef, inv_t) -> None:
        C, V = logits.shape
        H = h_w.shape[1]
        filt = self.filt
        (bm2, unit), (r0, bn3) = filt.tiles_dh, filt.tiles_dw
        write = plan["write"].to(torch.uint8).contiguous()
        block, warps = row_launch(V, unit)
        _soft_grad_kernel[(C,)](logits, logits.stride(0), mask.to(torch.int8), res["lse"], res["ez"], res["g_lp"],
                                res["g_ent"], write, write.shape[1], V, inv_t, ROWS=r0, UNIT=unit, BLOCK_V=block,
                                num_warps=warps)
        gw_acc, gb_acc = self.gw_acc, self.gb_acc
        if plan["dense"]:               # every tile kept: the soft part fills the chunk, dense products
            _dense_products(logits, logits, coef, w_p, y_p, h_w, gh_c, gw_acc, gb_acc, self.acc_strategy)
            return
        f32 = INTERPRET or logits.dtype == torch.float32        # the interpreter multiplies bf16 wrongly
        cfg = filtered_launch(H, filt.block_h, f32)
        bh = cfg["BH"]
        if gh_c is not None:
            idx, cnt = kept_lists(plan["dh"])
            _filtered_dh_kernel[(plan["dh"].shape[0], triton.cdiv(H, bh))](
                logits, logits.stride(0), w_p, w_p.stride(0), y_p, coef.contiguous(), idx, idx.shape[1], cnt,
                gh_c, gh_c.stride(0), C, V, H, BM=bm2, BN=unit, BH=bh, DOT_F32=f32, num_warps=cfg["num_warps"])
        if gw_acc is not None or gb_acc is not None:
            idx, cnt = kept_lists(plan["dw"].t())
            gw_t = gw_acc if gw_acc is not None else torch.empty(1, 1, dtype=torch.float32, device=logits.device)
            _filtered_dw_kernel[(triton.cdiv(H, bh) if gw_acc is not None else 1, plan["dw"].shape[1])](
                logits, logits.stride(0), h_w, h_w.stride(0), idx, idx.shape[1], cnt, gw_t, gw_t.stride(0),
                gb_acc if gb_acc is not None else gw_t, C, V, H if gw_acc is not None else 0, BM=r0, BN=bn3, BH=bh,
                BLOCKS=cfg["BLOCKS"], HAS_BIAS=gb_acc is not None, DOT_F32=f32, num_warps=cfg["num_warps"])

    def finish(self):
        """(grad_hidden, grad_weight, grad_bias) in the inputs' order and dtypes; fills :attr:`stats`."""
        order = self.order
        self.head = None                 # the permuted weight copy goes before the conversion allocates
        gw = None if self.gw_acc is None else _to_dtype_rows(self.gw_acc, self.weight_dtype, order)
        gb = None if self.gb_acc is None else _to_dtype_rows(self.gb_acc, self.bias_dtype, order)
        self.gw_acc = self.gb_acc = None
        filt, t, dev = self.filt, self.totals, self.device
        if filt.collect_stats:
            f = lambda x: torch.as_tensor(x, dtype=torch.float64, device=dev)
            skipped_dh = 1.0 - f(t["kept_dh"]) / max(t["tiles_dh"], 1)
            skipped_dw = 1.0 - f(t["kept_dw"]) / max(t["tiles_dw"], 1)
            self.stats = FilterStats(
                skipped_dh=skipped_dh, skipped_dw=skipped_dw, skipped_fraction=0.5 * (skipped_dh + skipped_dw),
                tiles_dh=t["tiles_dh"], tiles_dw=t["tiles_dw"], dropped_l1_bound_dh=f(t["dropped_dh"]),
                dropped_l1_bound_dw=f(t["dropped_dw"]), row_scale_l1=f(t["row_scale"]),
                rows_lowered=torch.as_tensor(t["rows_lowered"], device=dev), threshold=filt.threshold,
                row_bound=filt.row_bound, dense_above=filt.dense_above, vocab_ordered=order is not None,
                tiles={"dh": tuple(filt.tiles_dh), "dw": tuple(filt.tiles_dw)}, dense_chunks=t["dense_chunks"],
                chunks=t["chunks"])
        return self.gh, gw, gb
