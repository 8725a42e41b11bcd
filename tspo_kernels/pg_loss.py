"""K3: fused LM head + masked clipped policy-gradient loss (docs/algorithm.md §4, §5 K3).

``fused_linear_pg_loss`` computes, for hidden states ``h`` (N, H) and an LM-head weight ``W``
(V, H), the docs/algorithm.md §4 objective of every loss-masked token without ever holding the (N, V)
logits: tokens are processed ``chunk_size`` rows at a time.  Per chunk

1. ``logits = h_c W^T (+ b)``                 (C, V) in the input dtype (a matrix product)
2. one row per program: an online log-sum-exp over vocabulary blocks gives log pi(target),
   the entropy and, from them, the per-token loss and its derivative with respect to log pi
   and to the entropy.  Those two numbers fix the whole gradient row, so a second sweep over
   the row overwrites the logits *in place* with d loss / d logits.
3. ``grad_h[c] = dlogits @ W`` and ``grad_W += dlogits^T @ h_c``  (two more products)

Three matrix products in all, no recomputation in backward: the gradients are computed in
the forward pass and saved; backward only scales them by the incoming gradient.  Extra memory:
one (C, V) logits chunk in the input dtype (plus, on the PyTorch path, two float32 (C, V)
buffers, three for 16-bit inputs), the gradients themselves and, for 16-bit weights split over
several chunks, a float32 accumulator and a scratch buffer of the weight's size.

Step 2 runs as a Triton kernel (``backend="triton"``, the default on CUDA) or as PyTorch ops
(``backend="torch"``, the default on CPU; float64 allowed).  The products use torch.matmul.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch
import triton
import triton.language as tl

from . import _checks, reference
from .reference import PGLossOutput

__all__ = ["PGLossOutput", "fused_linear_logprobs", "fused_linear_pg_loss"]

_HALF = (torch.float16, torch.bfloat16)
_MASK_DTYPES = (torch.bool,) + _checks.INT_DTYPES + _checks.FLOAT_DTYPES


# --------------------------------------------------------------------------- Triton kernel
@triton.jit
def _pg_rows_kernel(
    logits_ptr, stride_row, targets_ptr,
    mask_ptr, old_ptr, adv_ptr, ref_ptr, roll_ptr, w_ptr, inv_norm_ptr,
    logp_ptr, ent_ptr, kl_ptr, tok_loss_ptr, clipped_ptr,
    V, inv_temp, ratio_lo, ratio_hi, dual_clip, beta, kl_clamp, entropy_coef, tis_cap,
    HAS_LOSS: tl.constexpr, HAS_REF: tl.constexpr, HAS_DUAL: tl.constexpr,
    HAS_TIS: tl.constexpr, HAS_W: tl.constexpr, HAS_OLD: tl.constexpr, WRITE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """One program per token row of a (C, V) logits chunk.

    Sweep 1: online max / sum exp / sum exp*z over vocabulary blocks -> lse, E[z], entropy,
    log pi(target) and the per-token loss terms.  Sweep 2 (WRITE_GRAD): overwrite the row with
    d loss / d logits = (g_lp * (onehot - p) - g_ent * p * (z - E[z])) / temperature.
    All arithmetic is float32 (16-bit logits are upcast after loading).
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
        m_new = tl.maximum(m, tl.max(tl.where(valid, z, float("-inf")), axis=0))
        alpha = tl.exp(m - m_new)
        e = tl.where(valid, tl.exp(z - m_new), 0.0)
        s = s * alpha + tl.sum(e, axis=0)
        t = t * alpha + tl.sum(e * z, axis=0)
        m = m_new
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
        if HAS_OLD:
            old = tl.load(old_ptr + row)
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
            w = tl.minimum(tl.exp(old - tl.load(roll_ptr + row)), tis_cap)
            pg = pg * w
            g_lp = g_lp * w
        total = pg - entropy_coef * ent
        kl = 0.0
        if HAS_REF:
            d = tl.load(ref_ptr + row) - logp
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
            kl = tl.minimum(raw, kl_clamp)
            total = total + beta * kl
            g_lp = g_lp - beta * tl.where(raw <= kl_clamp, em1, 0.0)
        inv_norm = tl.load(inv_norm_ptr)
        if HAS_W:                                        # per-token weight of the objective
            tw = tl.load(w_ptr + row)
            total = total * tw
            inv_norm = inv_norm * tw                     # scales both gradient terms below
        g_lp = tl.where(in_loss, g_lp * inv_norm, 0.0)
        g_ent = tl.where(in_loss, -entropy_coef * inv_norm, 0.0)
        tl.store(tok_loss_ptr + row, tl.where(in_loss, total, 0.0))
        tl.store(kl_ptr + row, tl.where(in_loss, kl, 0.0))
        tl.store(clipped_ptr + row, tl.where(in_loss & clipped, 1.0, 0.0))

        if WRITE_GRAD:
            for start in range(0, V, BLOCK_V):
                cols = start + offs
                valid = cols < V
                z = tl.load(base + cols, mask=valid, other=0.0).to(tl.float32) * inv_temp
                p = tl.exp(z - lse)
                dz = tl.where(cols == y, g_lp, 0.0) - p * (g_lp + g_ent * (z - ez))
                tl.store(base + cols, (dz * inv_temp).to(logits_ptr.dtype.element_ty), mask=valid)


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


def _chunk_rows(chunk_size, N: int, H: int, V: int) -> int:
    """Token rows per chunk.  Default: about N*H/V rows (the logits chunk is about the size
    of ``hidden``), rounded up to a power of two, at least 256 (or N)."""
    if chunk_size is None:
        rows = triton.next_power_of_2(max(1, triton.cdiv(N, triton.cdiv(V, H))))
        return max(1, min(N, max(256, rows)))
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    return max(1, min(N, chunk_size))


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


def _inv_norm(normalizer, mask, cd, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(1 / normalizer, masked-token count), both 0-dim ``cd`` tensors on ``device``."""
    count = mask.sum().to(cd)
    if normalizer is None:
        return 1.0 / count.clamp(min=1.0), count
    if isinstance(normalizer, torch.Tensor):
        if normalizer.numel() != 1:
            raise ValueError(f"normalizer must be a number or a one-element tensor, got shape "
                             f"{tuple(normalizer.shape)}")
        return 1.0 / normalizer.detach().reshape(()).to(device=device, dtype=cd), count
    value = _number("normalizer", normalizer, low=0.0, strict=True)
    return torch.full((), 1.0 / value, dtype=cd, device=device), count


# --------------------------------------------------------------------------- per-chunk cores
def _k3_and_expm1(d):
    """(exp(d) - d - 1, exp(d) - 1) without the cancellation at small |d| (as in the kernel)."""
    small = d.abs() < 0.5
    ds = torch.where(small, d, torch.zeros_like(d))
    poly = torch.full_like(d, 1.0 / 362880.0)
    for k in range(8, 1, -1):                        # sum_{k=2..9} d^(k-2) / k!
        poly = poly * ds + 1.0 / math.factorial(k)
    ed = torch.exp(d)
    return (torch.where(small, ds * ds * poly, ed - d - 1.0),
            torch.where(small, ds + ds * ds * poly, ed - 1.0))


def _token_terms_torch(logp, ent, tok, opt: _Options, inv_norm):
    """Per-token loss, kl, clipped flag and d loss / d logp, d loss / d entropy (masked, scaled)."""
    mask, adv = tok["mask"], tok["advantages"]
    old = tok.get("old_logp", logp)                   # None given: on-policy, rho = 1
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
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
        w = torch.exp(old - tok["rollout_logp"]).clamp(max=opt.tis_cap)
        pg, g_lp = pg * w, g_lp * w
    total = pg - opt.entropy_coef * ent
    kl = torch.zeros_like(logp)
    if opt.has_ref:
        raw, em1 = _k3_and_expm1(tok["ref_logp"] - logp)
        kl = raw.clamp(max=opt.kl_clamp)
        total = total + opt.beta * kl
        g_lp = g_lp - opt.beta * torch.where(raw <= opt.kl_clamp, em1, zero)
    if "weights" in tok:                              # per-token weight of the objective
        tw = tok["weights"]
        total, inv_norm = total * tw, inv_norm * tw    # inv_norm scales g_lp and g_ent below
    g_ent = torch.where(mask, -opt.entropy_coef * inv_norm, zero)
    return {
        "tok_loss": torch.where(mask, total, zero),
        "kl": torch.where(mask, kl, zero),
        "clipped": (clipped & mask).to(logp.dtype),
        "g_lp": torch.where(mask, g_lp * inv_norm, zero),
        "g_ent": g_ent,
    }


def _core_torch(logits, y, tok, opt, inv_norm, write_grad: bool, has_loss: bool,
                need_entropy: bool = True):
    """PyTorch version of the row kernel on one (C, V) chunk; returns per-token (C,) results.

    Uses log_softmax (ls) and p = exp(ls): z - E[z] = ls + entropy, so
    d loss / d z = onehot * g_lp - p * (g_lp + g_ent * (ls + entropy)).
    """
    cd = torch.float64 if logits.dtype == torch.float64 else torch.float32
    z = logits.to(cd)                      # the chunk itself when it is already ``cd``
    if opt.temperature != 1.0:
        z.mul_(1.0 / opt.temperature)
    ls = torch.log_softmax(z, dim=1)
    res = {"logp": ls.gather(1, y[:, None])[:, 0]}
    if not (has_loss or need_entropy):
        return res
    p = ls.exp()
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
        if dz is not logits:
            logits.copy_(dz)
    return res


def _block_v(V: int, device: torch.device) -> int:
    cap = 4096 if device.type == "cuda" else 128   # the interpreter: small blocks, several of them
    return min(cap, triton.next_power_of_2(V))


def _core_triton(logits, y, tok, opt, inv_norm, write_grad: bool, has_loss: bool,
                 need_entropy: bool = True):
    """Triton row kernel on one contiguous (C, V) chunk; returns per-token (C,) results."""
    rows, V = logits.shape
    f32 = dict(dtype=torch.float32, device=logits.device)
    res = {"logp": torch.empty(rows, **f32), "entropy": torch.empty(rows, **f32)}
    if has_loss:
        res.update({k: torch.empty(rows, **f32) for k in ("tok_loss", "kl", "clipped")})
    dummy = res["logp"]
    get = lambda k: res.get(k, dummy)  # noqa: E731
    tk = lambda k: tok.get(k, dummy)  # noqa: E731
    mask = tok["mask"].to(torch.int8) if has_loss else dummy
    block = _block_v(V, logits.device)
    _pg_rows_kernel[(rows,)](
        logits, logits.stride(0), y,
        mask, tk("old_logp"), tk("advantages"), tk("ref_logp"), tk("rollout_logp"), tk("weights"),
        inv_norm if has_loss else dummy,
        res["logp"], res["entropy"], get("kl"), get("tok_loss"), get("clipped"),
        V, 1.0 / opt.temperature, 1.0 - opt.eps_low, 1.0 + opt.eps_high,
        opt.dual_clip or 0.0, opt.beta, opt.kl_clamp, opt.entropy_coef, opt.tis_cap or 0.0,
        HAS_LOSS=has_loss, HAS_REF=opt.has_ref, HAS_DUAL=opt.dual_clip is not None,
        HAS_TIS=opt.tis_cap is not None, HAS_W="weights" in tok, HAS_OLD="old_logp" in tok,
        WRITE_GRAD=write_grad, BLOCK_V=block,
        num_warps=8 if block >= 2048 else 4,
    )
    return res


# --------------------------------------------------------------------------- chunk loop
def _chunk_loop(hidden, weight, bias, targets, tok, opt, inv_norm, rows, triton_path, grads,
                has_loss, need_entropy=True):
    """Run every token chunk: per-token results (N,) and, when asked, the gradients.

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
    gw = torch.zeros(V, H, dtype=torch.float32 if acc_fp32 else weight.dtype, device=dev) if need_w else None
    gw_step = torch.empty_like(weight) if acc_fp32 else None
    gb = torch.zeros(V, dtype=cd, device=dev) if need_b else None
    buf = torch.empty(min(rows, N), V, dtype=hidden.dtype, device=dev)
    wt = weight.t()
    core = _core_triton if triton_path else _core_torch
    for s in range(0, N, rows):
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
        if need_w and gw_step is None:
            gw.addmm_(logits.t(), h_c)
        elif need_w:
            torch.mm(logits.t(), h_c, out=gw_step)
            gw.add_(gw_step)
        if need_b:
            gb.add_(logits.sum(0, dtype=cd))
    if need_w and gw.dtype != weight.dtype:
        gw = gw.to(weight.dtype)
    if need_b:
        gb = gb.to(bias.dtype)
    return out, gh, gw, gb


class _FusedLinearPGLoss(torch.autograd.Function):
    """Forward computes the loss *and* the gradients; backward scales them by grad_output."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, tok, opt, inv_norm, count, rows, triton_path, grads):
        out, gh, gw, gb = _chunk_loop(hidden, weight, bias, targets, tok, opt, inv_norm, rows,
                                      triton_path, grads, has_loss=True)
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
        return tuple(grads) + (None,) * 8


# --------------------------------------------------------------------------- public API
def fused_linear_pg_loss(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, old_logp: Optional[torch.Tensor],
    advantages: torch.Tensor, loss_mask: torch.Tensor, *,
    bias: Optional[torch.Tensor] = None, ref_logp: Optional[torch.Tensor] = None,
    rollout_logp: Optional[torch.Tensor] = None, eps_low: float = 0.2, eps_high: float = 0.2,
    dual_clip: Optional[float] = None, beta: float = 0.0, kl_clamp: float = 10.0,
    entropy_coef: float = 0.0, tis_cap: Optional[float] = None, temperature: float = 1.0,
    normalizer: Union[None, float, torch.Tensor] = None, weights: Optional[torch.Tensor] = None,
    chunk_size: Optional[int] = None, backend: str = "auto",
) -> PGLossOutput:
    """docs/algorithm.md §4 clipped policy-gradient loss through the LM head, without (N, V) logits.

    hidden (N, H) and weight (V, H) (and bias (V,)): one dtype among bfloat16, float16,
    float32 (float64 with backend="torch").  targets (N,) integer ids in [0, V).
    old_logp, advantages, ref_logp, rollout_logp: (N,) float; ``old_logp=None`` means
    on-policy (pi_old = pi, detached: rho = 1 with its gradient), which spares the forward-only
    log-prob pass a caller would otherwise run first.  loss_mask (N,): nonzero marks
    the tokens in the loss; the others contribute nothing (their per-token inputs are ignored).

    Per masked token: logits = (h W^T + b) / temperature, logp = log_softmax(logits)[target],
    rho = exp(logp - old_logp), pg = -min(rho A, clip(rho, 1-eps_low, 1+eps_high) A); with
    dual_clip c, pg = min(pg, -c A) where A < 0; with tis_cap C, pg *= min(exp(old_logp -
    rollout_logp), C) (constant); kl = clamp(exp(d) - d - 1, max=kl_clamp), d = ref_logp - logp;
    objective = pg + beta kl - entropy_coef entropy.
    loss = sum over masked tokens of weights * objective / normalizer (default normalizer: the
    masked-token count; loss 0 if no token is masked).  weights (N,) float, optional (default
    1): a per-token multiplier, e.g. 1/len(sequence) with normalizer = number of sequences for
    a sequence-mean of token-means; it scales neither ``kl`` nor ``clip_frac``.

    Returns ``PGLossOutput(loss, logp, entropy, kl, clip_frac)``: per-token outputs are (N,)
    float32 (float64 for float64 inputs); only ``loss`` is differentiable (w.r.t. hidden,
    weight and bias).  chunk_size: token rows per chunk (None: about N*H/V, >= 256).
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
    cd = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    if backend == "reference":          # the plain math: (N, V) logits, autograd
        _check_targets_range(targets, V)
        if isinstance(normalizer, (int, float)) and not isinstance(normalizer, bool):
            _number("normalizer", normalizer, low=0.0, strict=True)
        res = reference.pg_loss_reference(
            hidden, weight, targets, old_logp, advantages, loss_mask, bias=bias, ref_logp=ref_logp,
            rollout_logp=rollout_logp, eps_low=eps_low, eps_high=eps_high, dual_clip=dual_clip, beta=beta,
            kl_clamp=kl_clamp, entropy_coef=entropy_coef, tis_cap=tis_cap, temperature=temperature,
            normalizer=normalizer, weights=weights)
        return PGLossOutput(res.loss, *(x.to(cd) for x in res[1:]))
    tok = _token_inputs(cd, loss_mask, **per_token)
    _check_targets_range(targets, V)
    inv_norm, count = _inv_norm(normalizer, tok["mask"], cd, dev)
    rows = _chunk_rows(chunk_size, N, H, V)
    on = torch.is_grad_enabled()
    grads = (on and hidden.requires_grad, on and weight.requires_grad,
             on and bias is not None and bias.requires_grad)
    hidden_c, weight_c = hidden.contiguous(), weight.contiguous()
    bias_c = None if bias is None else bias.contiguous()
    out = _FusedLinearPGLoss.apply(hidden_c, weight_c, bias_c, targets.long().contiguous(), tok,
                                   opt, inv_norm, count, rows, triton_path, grads)
    return PGLossOutput(*out)


def fused_linear_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
    bias: Optional[torch.Tensor] = None, temperature: float = 1.0, return_entropy: bool = False,
    chunk_size: Optional[int] = None, backend: str = "auto",
):
    """Forward-only log pi(targets) through the LM head (for pi_old and pi_ref), no grad.

    hidden (N, H), weight (V, H), bias (V,) in one float dtype; targets (N,) ids in [0, V).
    Returns logp (N,) float32 (float64 for float64 inputs), and entropy (N,) when
    ``return_entropy``.  No (N, V) tensor is built: chunk_size rows at a time.
    """
    N, H, V = _check_head(hidden, weight, targets, bias)
    dev = _checks.same_device(hidden=hidden, weight=weight, targets=targets, bias=bias)
    triton_path = _resolve_backend(backend, dev, hidden.dtype)
    opt = _options(0.2, 0.2, None, 0.0, 10.0, 0.0, None, temperature, None, None)
    _check_targets_range(targets, V)
    if backend == "reference":
        cd = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        with torch.no_grad():
            res = reference.logprobs_reference(hidden, weight, targets, bias=bias, temperature=temperature,
                                               return_entropy=return_entropy)
        return tuple(x.to(cd) for x in res) if return_entropy else res.to(cd)
    rows = _chunk_rows(chunk_size, N, H, V)
    with torch.no_grad():
        out, *_ = _chunk_loop(hidden.detach().contiguous(), weight.detach().contiguous(),
                              None if bias is None else bias.detach().contiguous(),
                              targets.long().contiguous(), {}, opt, None, rows, triton_path,
                              (False, False, False), has_loss=False, need_entropy=return_entropy)
    return (out["logp"], out["entropy"]) if return_entropy else out["logp"]
