"""K3's chunk loop and autograd Function: C token rows at a time, never the (N, V) logits.

Per chunk: product 1, ``logits = h_c W^T (+ b)`` into one reused (C, V) buffer (cuBLAS); the row
step (``rows.core_triton`` / ``rows.core_torch``) writes the per-token results and, when the
product step asks for it, d loss / d logits in place; then the *product step* turns the chunk
into gradients.  Product steps (``head``, ``write_grad``, ``stats_unit``, ``chunk``, ``finish``):

* :class:`NoProducts`: none (log-probs, or a loss without gradients);
* :class:`DenseStep`: ``grad_hidden[c] = dlogits @ W`` and ``grad_W += dlogits^T @ h_c`` (float32
  accumulation inside the product for 16-bit weights, ``gemm.add_product_``), ``grad_b +=``
  column sums;
* ``filtered.FilteredStep``: the block-sparse products of ``backward="filtered"``.

The gradients are computed in the forward pass and saved; backward only scales them.
:func:`chunk_rows` sizes C from the memory budget.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Tuple

import torch
import triton

from .filtered import FilteredStep
from .gemm import add_product_
from .options import HALF, FilterOptions, FilterStats, LossOptions
from .rows import core_torch, core_triton

__all__ = ["DenseStep", "LossCall", "NoProducts", "chunk_loop", "chunk_rows", "fused_pg_loss"]


def chunk_rows(chunk_size: Optional[int], N: int, H: int, V: int, *, budget: Optional[int], default_budget: int,
               cuda: bool, elem: int = 4, torch_path: bool = False, need_h: bool = False, need_w: bool = False,
               weight_half: bool = False, extra_fixed: int = 0, extra_per_row: int = 0) -> int:
    """Token rows per chunk.

    ``chunk_size`` given: that (at most N).  Otherwise on CUDA (or whenever ``budget`` is given)
    from a memory budget (``budget``, else ``default_budget`` bytes): what stays for the whole call
    (grad_hidden N H, the float32 weight-gradient accumulator 4 V H for 16-bit weights,
    ``extra_fixed``) is taken off, and the rest holds one (C, V) chunk (``elem`` bytes an entry,
    plus the PyTorch path's float32 buffers and ``extra_per_row``); at least 128 rows, a
    multiple of 128, and the chunks of a call balanced.  On CPU without a budget: about N*H/V
    rows (the logits chunk about the size of ``hidden``), a power of two, at least 256.
    """
    if chunk_size is not None:
        return max(1, min(N, chunk_size))
    if N <= 1:
        return 1
    if budget is None and not cuda:
        rows = triton.next_power_of_2(max(1, triton.cdiv(N, triton.cdiv(V, H))))
        return max(1, min(N, max(256, rows)))
    budget = default_budget if budget is None else budget
    per_row = V * elem + extra_per_row + (V * 4 * (3 if elem < 4 else 2) if torch_path else 0)
    fixed = (N * H * elem if need_h else 0) + (V * H * 4 if need_w and weight_half else 0) + extra_fixed
    most = (budget - fixed) // per_row
    if most >= N:
        return N
    most = max(128, most // 128 * 128)
    n_chunks = triton.cdiv(N, most)
    return min(N, most, triton.cdiv(triton.cdiv(N, n_chunks), 128) * 128)


# --------------------------------------------------------------------------- product steps
class NoProducts:
    """No gradients: the chunk loop computes the per-token results only."""

    write_grad = False
    stats_unit = 0
    stats = None

    def __init__(self, weight, bias, targets):
        self.head = (weight, bias, targets)

    def chunk(self, s, e, h_c, logits, res, tok_c) -> None:
        pass

    def finish(self):
        self.head = None
        return None, None, None


class DenseStep:
    """The dense path: the row step writes d loss / d logits into the chunk, then
    ``grad_hidden[c] = dlogits @ W``, ``grad_W (+)= dlogits^T @ h_c`` (rows outside the loss
    zeroed in h_c: 0 * NaN would reach the product), ``grad_b += sum dlogits``."""

    write_grad = True
    stats_unit = 0
    stats = None

    def __init__(self, hidden, weight, bias, targets, grads, *, rows: int, acc_strategy: str):
        N, H = hidden.shape
        V = weight.shape[0]
        dev = hidden.device
        need_h, need_w, need_b = grads
        self.head = (weight, bias, targets)
        self.weight, self.bias_dtype = weight, None if bias is None else bias.dtype
        self.cd = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        self.gh = torch.empty_like(hidden) if need_h else None
        self.acc_fp32 = need_w and weight.dtype in HALF and N > rows
        self.gw = None
        if need_w:
            make = torch.zeros if N == 0 else torch.empty          # the first product writes it
            self.gw = make(V, H, dtype=torch.float32 if self.acc_fp32 else weight.dtype, device=dev)
        self.acc_strategy = acc_strategy
        self.gb = torch.zeros(V, dtype=self.cd, device=dev) if need_b else None

    def chunk(self, s, e, h_c, logits, res, tok_c) -> None:
        if self.gh is not None:
            torch.mm(logits, self.weight, out=self.gh[s:e])
        if self.gw is not None:
            h_w = torch.where(tok_c["mask"][:, None], h_c, torch.zeros((), dtype=h_c.dtype, device=h_c.device))
            if self.acc_fp32:
                add_product_(self.gw, logits.t(), h_w, first=s == 0, strategy=self.acc_strategy)
            elif s == 0:
                torch.mm(logits.t(), h_w, out=self.gw)
            else:
                self.gw.addmm_(logits.t(), h_w)
        if self.gb is not None:
            self.gb.add_(logits.sum(0, dtype=self.cd))

    def finish(self):
        self.head = None
        gw, gb = self.gw, self.gb
        if gw is not None and gw.dtype != self.weight.dtype:
            gw = gw.to(self.weight.dtype)
        if gb is not None:
            gb = gb.to(self.bias_dtype)
        self.gw = self.gb = self.weight = None
        return self.gh, gw, gb


# --------------------------------------------------------------------------- the loop
def chunk_loop(hidden, tok: dict, opt: LossOptions, inv_norm, *, rows: int, triton_path: bool, step,
               has_loss: bool, need_entropy: bool = True) -> Tuple[dict, tuple]:
    """Run every token chunk through product 1, the row step and ``step``; returns the per-token
    results {name: (N,)} and ``step.finish()`` (grad_hidden, grad_weight, grad_bias)."""
    N = hidden.shape[0]
    weight, bias, targets = step.head
    V = weight.shape[0]
    dev = hidden.device
    cd = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    keys = ("logp",) + (("entropy",) if has_loss or need_entropy else ())
    keys += ("tok_loss", "kl", "clipped") if has_loss else ()
    out = {k: torch.empty(N, dtype=cd, device=dev) for k in keys}
    core: Callable = core_triton if triton_path else core_torch
    write_grad = has_loss and step.write_grad
    stats_unit = step.stats_unit if has_loss else 0
    buf = torch.empty(min(rows, N), V, dtype=hidden.dtype, device=dev)
    wt = weight.t()
    for s in range(0, N, rows):
        e = min(N, s + rows)
        h_c, logits = hidden[s:e], buf[: e - s]
        if bias is None:
            torch.mm(h_c, wt, out=logits)
        else:
            torch.addmm(bias, h_c, wt, out=logits)
        tok_c = {k: v[s:e] for k, v in tok.items()}
        res = core(logits, targets[s:e], tok_c, opt, inv_norm, write_grad=write_grad, has_loss=has_loss,
                   need_entropy=need_entropy, stats_unit=stats_unit)
        for k in keys:
            out[k][s:e] = res[k]
        step.chunk(s, e, h_c, logits, res, tok_c)
    del buf, wt, weight, bias, targets
    return out, step.finish()


# --------------------------------------------------------------------------- the Function
@dataclass
class LossCall:
    """What the loss's forward needs beside its differentiable inputs (hidden, weight, bias)."""

    targets: torch.Tensor
    tok: dict                            # per-token inputs (N,) and the bool mask
    opt: LossOptions
    inv_norm: torch.Tensor               # 1 / normalizer (0-dim)
    count: torch.Tensor                  # masked tokens (0-dim)
    rows: int                            # chunk rows
    triton_path: bool
    grads: Tuple[bool, bool, bool]       # grad_hidden, grad_weight, grad_bias wanted
    acc_strategy: str                    # gemm strategy of 16-bit weight gradients
    filt: Optional[FilterOptions] = None
    stats: Optional[FilterStats] = field(default=None)   # filled by the filtered forward

    def step(self, hidden, weight, bias):
        if not any(self.grads):
            return NoProducts(weight, bias, self.targets)
        if self.filt is None:
            return DenseStep(hidden, weight, bias, self.targets, self.grads, rows=self.rows,
                             acc_strategy=self.acc_strategy)
        return FilteredStep(hidden, weight, bias, self.targets, self.grads, self.filt, inv_temp=self.opt.inv_temp,
                            triton_path=self.triton_path, acc_strategy=self.acc_strategy)


class _FusedLinearPGLoss(torch.autograd.Function):
    """Forward computes the loss *and* the gradients; backward scales them by grad_output."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, call: LossCall):
        step = call.step(hidden, weight, bias)
        out, (gh, gw, gb) = chunk_loop(hidden, call.tok, call.opt, call.inv_norm, rows=call.rows,
                                       triton_path=call.triton_path, step=step, has_loss=True)
        call.stats = step.stats
        loss = out["tok_loss"].sum() * call.inv_norm
        clip_frac = out["clipped"].sum() / call.count.clamp(min=1.0)
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
        return tuple(grads) + (None,)


def fused_pg_loss(hidden, weight, bias, call: LossCall):
    """(loss, logp, entropy, kl, clip_frac) through the Function; ``call.stats`` filled."""
    return _FusedLinearPGLoss.apply(hidden, weight, bias, call)
