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

**Gradient-filtered path** (``backward="filtered"``; :mod:`.filtered` gives the rule and its
proof).  Most of a trained policy's softmax mass sits on few tokens, so most entries of d loss /
d logits are far below what a 16-bit product resolves.  From the largest logit of every
vocabulary unit the row sweep bounds every entry of the *soft part* of d loss / d logits (all
but the target term, which is always added exactly); the products skip the tiles whose entries
are all below the bound's threshold.  Error admitted, for each product and token row t, with
s_t = |d loss / d log pi_t| + |d loss / d entropy_t| and T the temperature:

    each dropped entry      |delta_tv| <= tau s_t / T          (tau = ``filter_threshold``, default 2^-12)
    a row's dropped total   sum_v |delta_tv| <= rho s_t / T     (rho = ``filter_row_bound``, default
                                                               :data:`FILTER_ROW_BOUND`)

so |err grad_h[t, j]| <= max_v |W_vj| rho s_t / T: a row whose probability mass is spread wide
(a high-entropy row) keeps the tiles it needs instead of losing its soft gradient.  A chunk whose
kept share of tiles exceeds ``filter_dense_above`` (default 0.75) runs the dense products
instead (exact for that chunk).  ``vocab_order="mean_logit"`` (default) sorts the vocabulary by
its mean logit over the loss-masked tokens before tiling.  The filtered path computes the same
forward outputs as the dense path; ``filter_stats=True`` returns what it skipped and the bounds
on what it dropped in ``PGLossOutput.filter_stats`` (:class:`FilterStats`).

Step 2 runs as a Triton kernel (``backend="triton"``, the default on CUDA) or as PyTorch ops
(``backend="torch"``, the default on CPU; float64 allowed).

**Non-finite inputs** (one policy, every backend; docs/algorithm.md §5): a NaN or inf in any
input that enters the objective of a loss-masked token (its hidden row, W, b, old_logp,
advantages, weights, rollout_logp with tis_cap, ref_logp with beta != 0) makes that token's
objective NaN: the loss is NaN, and so are its gradient row and therefore grad_weight.  Tokens
outside the loss mask never reach the loss or the gradients: NaN/inf in their hidden rows or
per-token inputs leave both unchanged (their grad_hidden rows are 0); their per-token outputs
(logp, entropy) are computed as usual.  ``normalizer`` must be finite and > 0 (ValueError).

Files, one concern each: this module, the public functions and the validation of their
arguments; :mod:`.options`, the typed options and statistics; :mod:`.rows`, the row kernel and
its PyTorch twin (step 2); :mod:`.filtered`, the filtered path's plan, bound, kernels and
product step; :mod:`.gemm`, the float32-accumulating GEMM; :mod:`.chunks`, the chunk loop with
its pluggable product step, the memory budget and the autograd Function.
"""
from __future__ import annotations

import math
import warnings
from typing import Optional, Union

import torch
import triton

from .. import _checks, reference
from ..reference import PGLossOutput
from .chunks import LossCall, NoProducts, chunk_loop, chunk_rows, fused_pg_loss
from .filtered import VOCAB_ORDERS, check_tiles, vocab_permutation
from .gemm import auto_strategy
from .gemm import dtype_out_ok as _dtype_out_ok  # noqa: F401  (re-exported: tests ask it about the build)
from .options import HALF, FilterOptions, FilterStats, LossOptions
from .rows import _pg_rows_kernel as _pg_rows_kernel  # the row kernel, compiled by tests/test_pg_loss.py

__all__ = ["BACKWARDS", "FILTER_BLOCK_H", "FILTER_ROW_BOUND", "FILTER_TILES", "MEMORY_BUDGET", "VOCAB_ORDERS",
           "FilterStats", "PGLossOutput", "fused_linear_logprobs", "fused_linear_pg_loss"]

#: default extra memory of one call on CUDA (bytes): accumulator + grad_hidden + logits chunk
MEMORY_BUDGET = int(3.75 * 2**30)
#: skip tiles of the filtered products: (token rows, vocabulary columns) of grad_hidden's ("dh")
#: and grad_weight's ("dw") tiles.  dh rows must be a multiple of dw rows, dw columns a multiple
#: of dh columns (dh columns are the vocabulary unit of the stored maxima, dw rows the row unit).
FILTER_TILES = {"dh": (128, 64), "dw": (32, 128)}
#: hidden columns per program of the filtered products
FILTER_BLOCK_H = 128
#: rho, the default bound on a row's dropped total, relative to s_t / T (``filter_row_bound``)
FILTER_ROW_BOUND = 2.0 ** -4
BACKWARDS = ("dense", "filtered")
#: tests and benchmarks: force the weight-gradient accumulation ("dtype_out" / "triton" / "upcast")
_ACC_OVERRIDE: Optional[str] = None

_MASK_DTYPES = (torch.bool,) + _checks.INT_DTYPES + _checks.FLOAT_DTYPES


def _acc_strategy(device: torch.device, dtype: torch.dtype) -> str:
    """The float32 weight-gradient accumulation of this call (``_ACC_OVERRIDE`` when set)."""
    return _ACC_OVERRIDE if _ACC_OVERRIDE is not None else auto_strategy(device, dtype)


# --------------------------------------------------------------------------- validation
def _number(name: str, value, *, low: float, strict: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value < low or (strict and value == low):
        raise ValueError(f"{name} must be {'>' if strict else '>='} {low}, got {value!r}")
    return float(value)


def _options(eps_low, eps_high, dual_clip, beta, kl_clamp, entropy_coef, tis_cap, temperature,
             ref_logp, rollout_logp) -> LossOptions:
    opt = LossOptions(
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


def _chunk_rows(chunk_size, N: int, H: int, V: int, *, device=None, budget: Optional[int] = None, **kw) -> int:
    """Token rows per chunk (:func:`.chunks.chunk_rows` with :data:`MEMORY_BUDGET` as the default
    budget); ``chunk_size`` validated here."""
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    cuda = device is not None and torch.device(device).type == "cuda"
    return chunk_rows(chunk_size, N, H, V, budget=budget, default_budget=MEMORY_BUDGET, cuda=cuda, **kw)


def _filter_memory(V: int, H: int, elem: int, ordered: bool) -> dict:
    """What the filtered path adds to the memory plan: the permuted weight copy (fixed) and, per
    chunk row, the unit maxima, log-sum-exps and masks and one masked hidden row."""
    return dict(extra_fixed=V * H * elem if ordered else 0,
                extra_per_row=triton.cdiv(V, FILTER_TILES["dh"][1]) * 12 + H * elem)


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


def _filter_stats_request(filter_stats) -> bool:
    """``filter_stats``: None / False (no statistics), True, or (deprecated) a dict to fill."""
    if filter_stats is None or isinstance(filter_stats, bool):
        return bool(filter_stats)
    if isinstance(filter_stats, dict):
        warnings.warn("filter_stats=<dict> is deprecated: pass filter_stats=True and read "
                      "PGLossOutput.filter_stats (a FilterStats; .as_dict() gives these keys)",
                      DeprecationWarning, stacklevel=3)
        return True
    raise TypeError(f"filter_stats must be a bool (or None), got {type(filter_stats).__name__}")


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
    filter_stats: Union[None, bool, dict] = None, filter_dense_above: float = 0.75,
    filter_row_bound: Optional[float] = None, backend: str = "auto",
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
    weight and bias).  ``.filter_stats``: a :class:`FilterStats` with ``backward="filtered"``
    and ``filter_stats=True`` (when a gradient was computed), else None.

    chunk_size: token rows per chunk (None: from ``memory_budget`` bytes on CUDA, default
    :data:`MEMORY_BUDGET`; about N*H/V rows, >= 256, on CPU unless a budget is given).
    backward: "dense" (default) or "filtered" (skips the tiles of d loss / d logits whose
    entries are all <= ``filter_threshold`` * (|d loss/d logp| + |d loss/d entropy|) / T, while
    no row drops more than ``filter_row_bound`` (default :data:`FILTER_ROW_BOUND`) times that
    in all: the bounds of the module docstring; ``vocab_order`` "mean_logit" (default), None or a
    permutation of range(V) sets the vocabulary order the tiles follow; ``filter_stats=True``
    returns the skipped fractions of both products (0-dim tensors), the tile counts, the
    dropped-mass bounds and ``dense_chunks`` / ``chunks`` in ``.filter_stats``; a dict, filled with
    the same, is deprecated).  ``filter_dense_above``: a chunk whose kept share of tiles (both
    products) exceeds it runs the dense products instead of the block-sparse ones (the sparse
    sweep costs more than it saves there; exact, nothing dropped in that chunk; one host sync
    per chunk to decide); 1 = never.
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
    row_bound = FILTER_ROW_BOUND if filter_row_bound is None else filter_row_bound
    row_bound = _number("filter_row_bound", row_bound, low=0.0, strict=False)
    want_stats = _filter_stats_request(filter_stats)
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
    memory = {}
    if backward == "filtered":
        tiles_dh, tiles_dw = (tuple(FILTER_TILES[k]) for k in ("dh", "dw"))
        check_tiles(tiles_dh, tiles_dw)
        order = vocab_permutation(vocab_order, hidden_c.detach(), weight_c.detach(), bias_c, tok["mask"])
        filt = FilterOptions(threshold=threshold, row_bound=row_bound, dense_above=dense_above, order=order,
                             tiles_dh=tiles_dh, tiles_dw=tiles_dw, block_h=FILTER_BLOCK_H, collect_stats=want_stats)
        memory = _filter_memory(V, H, elem, order is not None)
    rows = _chunk_rows(chunk_size, N, H, V, device=dev, elem=elem, torch_path=not triton_path, need_h=grads[0],
                       need_w=grads[1], weight_half=weight.dtype in HALF, budget=budget, **memory)
    call = LossCall(targets=targets.long().contiguous(), tok=tok, opt=opt, inv_norm=inv_norm, count=count, rows=rows,
                    triton_path=triton_path, grads=grads, acc_strategy=_acc_strategy(dev, weight.dtype), filt=filt)
    out = PGLossOutput(*fused_pg_loss(hidden_c, weight_c, bias_c, call))
    if call.stats is not None:
        out.filter_stats = call.stats
        if isinstance(filter_stats, dict):
            filter_stats.update(call.stats.as_dict())
    return out


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
        step = NoProducts(weight.detach().contiguous(), None if bias is None else bias.detach().contiguous(),
                          targets.long().contiguous())
        out, _ = chunk_loop(hidden.detach().contiguous(), {}, opt, None, rows=rows, triton_path=triton_path,
                            step=step, has_loss=False, need_entropy=return_entropy)
    return (out["logp"], out["entropy"]) if return_entropy else out["logp"]

