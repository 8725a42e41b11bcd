"""K3: fused LM-head + masked policy-gradient loss against the float64 reference.

Both paths are checked: the chunked PyTorch path (backend="torch") and the Triton row kernel
(backend="triton"; on a CPU machine it runs in Triton's interpreter, hence the small shapes).
Inputs are random and fresh every run (the ``seed`` fixture; TSPO_TEST_SEED replays a run); the
reference runs on float64 copies of the very inputs the kernel sees.
"""
import math
import os
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import tspo_kernels
from tspo_kernels import fused_linear_logprobs, fused_linear_pg_loss
from tspo_kernels import pg_loss as pg_mod
from tspo_kernels.reference import logprobs_reference, pg_loss_reference

# relative error by norm, per input dtype (error_of adjusts it for badly conditioned outputs).
# bf16: over 2,000 random cases per option set the worst gradient error was 2.05e-2 (T = 1), so
# 3e-2; the PyTorch path's float32 errors stayed below 3.1e-6 and its fp16 ones below 4.4e-3
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}
BACKENDS = ["torch", "triton"]
OUTPUTS = ("loss", "logp", "entropy", "kl", "clip_frac")

# option sets: (name, kwargs, which optional per-token inputs they need)
OPTION_SETS = {
    "plain": {},
    "dual_clip": {"dual_clip": 1.5},
    "kl": {"beta": 0.05, "ref": True},
    "kl_metric_only": {"ref": True},
    "kl_clamped": {"beta": 0.5, "kl_clamp": 0.05, "ref": True},
    "entropy": {"entropy_coef": 0.01},
    "tis": {"tis_cap": 1.3, "roll": True},
    "normalizer": {"normalizer": 7.5},
    "asym_clip": {"eps_low": 0.1, "eps_high": 0.28},
    "bias": {"bias": True},
    "temperature": {"temperature": 0.6},
    "weights": {"weights": True, "normalizer": 4.0},
    "all": {"bias": True, "ref": True, "roll": True, "dual_clip": 3.0, "beta": 0.02,
            "entropy_coef": 0.003, "tis_cap": 2.0, "temperature": 1.4, "normalizer": 33.0,
            "weights": True},
}


# --------------------------------------------------------------------------- helpers
#: how far log-ratios are kept from the clip / clamp switches, per input dtype: a token's logp in
#: a 16-bit kernel is off by up to ~0.03 (logits rounded to 8 bits, then divided by a temperature
#: of 0.6), enough to move a token across a switch at a margin of 0.03 in ~3% of random cases
MARGIN = {torch.float64: 0.03, torch.float32: 0.03, torch.float16: 0.1, torch.bfloat16: 0.1}


def _away(x, bounds, margin):
    """Move entries of ``x`` lying within ``margin`` of a switch point to ``margin`` from it:
    clip_frac and the gradient are discontinuous there, and 16-bit rounding of the logits
    would otherwise flip single tokens between branches."""
    for b in bounds:
        d = x - b
        x = torch.where(d.abs() < margin, b + margin * torch.where(d >= 0, 1.0, -1.0), x)
    return x


def _k3_roots(c):
    """Both roots of exp(d) - d - 1 = c (where the KL clamp switches), by bisection."""
    f = lambda d: math.exp(d) - d - 1.0 - c
    roots = []
    for lo, hi in ((-c - 2.0, 0.0), (0.0, math.log(c + 2.0) + 2.0)):
        for _ in range(80):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if (f(mid) > 0) == (f(lo) > 0) else (lo, mid)
        roots.append(0.5 * (lo + hi))
    return roots


def make_case(seed, N, H, V, dtype, *, opts=None, mask_p=0.7):
    """Random inputs in ``dtype``; old/ref/rollout log-probs lie near the current ones so that
    every branch (clipped low/high, unclipped, dual clip, KL clamp) is taken by some token."""
    opts = dict(opts or {})
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) / math.sqrt(H) * 2.0).to(dtype)
    bias = (torch.randn(V, generator=g) * 0.5).to(dtype) if opts.pop("bias", False) else None
    targets = torch.randint(0, V, (N,), generator=g)
    with torch.no_grad():
        lp = logprobs_reference(hidden.double(), weight.double(), targets,
                                bias=None if bias is None else bias.double(),
                                temperature=opts.get("temperature", 1.0)).float()
    switches = [math.log(1 - opts.get("eps_low", 0.2)), math.log(1 + opts.get("eps_high", 0.2))]
    if opts.get("dual_clip"):
        switches.append(math.log(opts["dual_clip"]))
    log_ratio = _away(0.4 * torch.randn(N, generator=g), switches, MARGIN[dtype])
    forced = min(N, 2) if opts.get("dual_clip") else 0   # tokens in the dual clip's region: A < 0,
    log_ratio[:forced] = math.log(opts.get("dual_clip") or 1.0) + 0.3   # ratio above dual_clip
    old = lp - log_ratio
    kw = {"bias": bias}
    if opts.pop("ref", False):
        d = _away(0.8 * torch.randn(N, generator=g), _k3_roots(opts.get("kl_clamp", 10.0)), MARGIN[dtype])
        kw["ref_logp"] = lp + d
    if opts.pop("roll", False):
        kw["rollout_logp"] = old + 0.5 * torch.randn(N, generator=g)
    if opts.pop("weights", False):                    # per-token weights, e.g. 1/len(sequence)
        kw["weights"] = 0.1 + 1.4 * torch.rand(N, generator=g)
    kw.update(opts)
    adv, mask = torch.randn(N, generator=g), torch.rand(N, generator=g) < mask_p
    adv[:forced], mask[:forced] = -adv[:forced].abs(), True
    return (hidden, weight, targets, old, adv, mask), kw


def run(fn, args, kw, *, dtype=None, grad_bias=True, **extra):
    """Forward + backward on fresh leaves (cast to ``dtype``); returns outputs and grads."""
    hidden, weight, *rest = args
    dtype = dtype or hidden.dtype
    h = hidden.detach().to(dtype).requires_grad_()
    w = weight.detach().to(dtype).requires_grad_()
    kw = dict(kw)
    b = None
    if kw.get("bias") is not None:
        b = kw["bias"].detach().to(dtype).requires_grad_(grad_bias)
        kw["bias"] = b
    out = fn(h, w, *rest, **kw, **extra)
    out.loss.backward()
    res = {k: getattr(out, k).detach() for k in OUTPUTS}
    res.update(grad_hidden=h.grad, grad_weight=w.grad)
    if out.filter_stats is not None:                  # backward="filtered" with filter_stats=True
        res["filter_stats"] = out.filter_stats
    if b is not None and grad_bias:
        res["grad_bias"] = b.grad
    return res


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    scale = b.norm()
    return float((a - b).norm() / scale) if scale > 0 else float((a - b).norm())


#: what reference_of adds to the reference's outputs to judge an error with (not outputs)
JUDGING = ("loss_scale", "kl_slope", "grad_cond")


def outputs_of(want):
    return [k for k in want if k not in JUDGING]


def error_of(k, got, want, dtype):
    """(error, tolerance) of output ``k``: its relative error by norm against ``TOL[dtype]``,
    judged by how well the output is conditioned:

    - the scalar loss is a signed sum that can cancel: its error is taken relative to the size
      of its terms (``want["loss_scale"]``) when that is larger;
    - kl = exp(d) - d - 1 of d = ref_logp - logp is ill-conditioned where it is small: the logp
      error (checked on its own) reaches it times its slope exp(d) - 1, so that share of the
      error (twice: second order) is not counted against the kl;
    - a temperature T < 1 multiplies the logits' rounding error by 1/T before the softmax: the
      gradients' tolerance grows by as much (``want["grad_cond"]``)."""
    g = got[k].double()
    err, tol = rel(g, want[k]), TOL[dtype]
    if k == "loss":
        err = float((g - want[k]).abs() / max(abs(float(want[k])), want["loss_scale"]))
    elif k == "kl" and "kl_slope" in want and float(want[k].norm()) > 0:
        carried = float((want["kl_slope"] * (got["logp"].double() - want["logp"])).norm())
        err = max(0.0, float((g - want[k]).norm()) - 2.0 * carried) / float(want[k].norm())
    elif k.startswith("grad_"):
        tol *= want.get("grad_cond", 1.0)
    return err, tol


def assert_close(got, want, dtype, keys=None):
    for k in keys or outputs_of(want):
        assert got[k] is not None, f"{k} is missing"
        assert got[k].shape == want[k].shape, f"{k}: shape {got[k].shape} vs {want[k].shape}"
        assert torch.isfinite(got[k]).all(), f"{k} has non-finite values"
        err, tol = error_of(k, got, want, dtype)
        assert err <= tol, f"{k}: relative error {err:.2e} > {tol:.1e}"


def reference_of(args, kw, **extra):
    """float64 reference, plus what assert_close needs to judge an error: the loss's term scale
    (sum over masked tokens of |w A| / normalizer), the gradients' conditioning by the
    temperature, and the slope of the kl in logp."""
    want = run(pg_loss_reference, args, kw, dtype=torch.float64, **extra)
    adv, mask = args[4].double(), args[5] != 0
    if kw.get("weights") is not None:
        adv = adv * kw["weights"].double()
    norm = kw.get("normalizer") or max(int(mask.sum()), 1)
    want["loss_scale"] = float(adv.abs()[mask].sum()) / norm
    want["grad_cond"] = max(1.0, 1.0 / float(kw.get("temperature", extra.get("temperature", 1.0))))
    if kw.get("ref_logp") is not None:              # |d kl / d logp| on loss tokens (0 where clamped)
        d = kw["ref_logp"].double() - want["logp"]
        raw = torch.expm1(d) - d
        want["kl_slope"] = torch.where(mask & (raw <= kw.get("kl_clamp", 10.0)), torch.expm1(d), 0.0)
    return want


# --------------------------------------------------------------------------- agreement
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("opt_name", list(OPTION_SETS))
def test_matches_reference(backend, dtype, opt_name, seed):
    args, kw = make_case(seed, 61, 32, 300, dtype, opts=OPTION_SETS[opt_name])
    got = run(fused_linear_pg_loss, args, kw, chunk_size=16, backend=backend)
    want = reference_of(args, kw)
    assert_close(got, want, dtype)
    assert 0.0 < float(want["clip_frac"]) < 1.0      # the case exercises clipping
    assert got["logp"].dtype == torch.float32


@pytest.mark.parametrize("opt_name,off", [("dual_clip", {"dual_clip": None}),
                                          ("kl", {"beta": 0.0}),
                                          ("kl_clamped", {"kl_clamp": 1e9}),
                                          ("entropy", {"entropy_coef": 0.0}),
                                          ("tis", {"tis_cap": 1e9}),
                                          ("asym_clip", {"eps_low": 0.2, "eps_high": 0.2}),
                                          ("weights", {"weights": None})])
def test_option_cases_are_not_trivial(opt_name, off, seed):
    """The test_matches_reference cases really take each option's branch: switching the
    option off changes the reference loss or its gradient."""
    args, kw = make_case(seed, 61, 32, 300, torch.float32, opts=OPTION_SETS[opt_name])
    on_ = reference_of(args, kw)
    off_ = reference_of(args, dict(kw, **off))
    assert max(rel(off_["loss"], on_["loss"]), rel(off_["grad_hidden"], on_["grad_hidden"])) > 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_all_options(backend, seed):
    args, kw = make_case(seed, 40, 32, 200, torch.float16, opts=OPTION_SETS["all"])
    assert_close(run(fused_linear_pg_loss, args, kw, chunk_size=16, backend=backend),
                 reference_of(args, kw), torch.float16)


@pytest.mark.parametrize("opt_name", ["plain", "all"])
def test_fp64_torch_path(opt_name, seed):
    args, kw = make_case(seed, 50, 24, 257, torch.float64, opts=OPTION_SETS[opt_name])
    got = run(fused_linear_pg_loss, args, kw, chunk_size=9, backend="torch")
    assert got["logp"].dtype == torch.float64
    assert_close(got, reference_of(args, kw), torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunk_size", [None, 1, 7, 64])
def test_chunk_size_does_not_change_results(backend, chunk_size, seed):
    args, kw = make_case(seed, 23, 16, 150, torch.float32, opts=OPTION_SETS["all"])
    assert_close(run(fused_linear_pg_loss, args, kw, chunk_size=chunk_size, backend=backend),
                 reference_of(args, kw), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("N,V", [(1, 300), (1, 1), (9, 129), (5, 2)])
def test_small_shapes(backend, N, V):
    """Fixed inputs, unlike the other agreement tests: with 1-9 tokens a gradient's relative error
    by norm is ill-conditioned (a target holding nearly all the probability makes 1 - p cancel;
    two classes make the bias gradient cancel), and fresh inputs went over the float32 tolerance
    in about 1% of runs.  These cases check the shapes; the random agreement is checked above."""
    args, kw = make_case(31 + N + V, N, 8, V, torch.float32, opts={"bias": True, "ref": True,
                                                                   "beta": 0.1, "entropy_coef": 0.1},
                         mask_p=1.0)
    assert_close(run(fused_linear_pg_loss, args, kw, chunk_size=4, backend=backend),
                 reference_of(args, kw), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_masked_rows_and_batch(backend, seed):
    B, L = 4, 9
    args, kw = make_case(seed, B * L, 16, 100, torch.float32, opts=OPTION_SETS["all"])
    mask = args[5].view(B, L).clone()
    mask[1] = False                                   # one sequence entirely outside the loss
    mask[2] = True
    args = args[:5] + (mask.view(-1),)
    assert_close(run(fused_linear_pg_loss, args, kw, chunk_size=8, backend=backend),
                 reference_of(args, kw), torch.float32)

    empty = args[:5] + (torch.zeros(B * L, dtype=torch.bool),)
    got = run(fused_linear_pg_loss, empty, kw, chunk_size=8, backend=backend)
    assert float(got["loss"]) == 0.0 and float(got["clip_frac"]) == 0.0
    for k in ("grad_hidden", "grad_weight", "grad_bias"):
        assert torch.count_nonzero(got[k]) == 0, k
    assert torch.count_nonzero(got["kl"]) == 0
    want = reference_of(empty, kw)
    assert_close(got, want, torch.float32, keys=["logp", "entropy"])


def test_empty_batch(seed):
    args, kw = make_case(seed, 0, 8, 50, torch.float32)
    got = run(fused_linear_pg_loss, args, kw, backend="torch")
    assert float(got["loss"]) == 0.0 and got["logp"].shape == (0,)
    assert torch.count_nonzero(got["grad_weight"]) == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_tokens_outside_the_mask_are_ignored(backend, seed):
    """NaN / inf per-token inputs outside the loss mask change nothing."""
    args, kw = make_case(seed, 30, 16, 120, torch.float32, opts={"ref": True, "roll": True,
                                                                "beta": 0.1, "tis_cap": 2.0,
                                                                "weights": True})
    hidden, weight, targets, old, adv, mask = args
    out_of_loss = ~mask
    poison = lambda x, v: torch.where(out_of_loss, torch.full_like(x, v), x)
    bad_args = (hidden, weight, targets, poison(old, float("nan")), poison(adv, float("inf")), mask)
    bad_kw = dict(kw, ref_logp=poison(kw["ref_logp"], float("-inf")),
                  rollout_logp=poison(kw["rollout_logp"], float("nan")),
                  weights=poison(kw["weights"], float("nan")))
    got = run(fused_linear_pg_loss, bad_args, bad_kw, chunk_size=8, backend=backend)
    assert_close(got, reference_of(args, kw), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_output_element_is_written(backend, monkeypatch, seed):
    """torch.empty / empty_like return NaN-filled memory: no output may keep any of it."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def nan_fill(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: nan_fill(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: nan_fill(real_empty_like(*a, **k)))
    args, kw = make_case(seed, 37, 16, 140, torch.float32, opts=OPTION_SETS["all"])
    got = run(fused_linear_pg_loss, args, kw, chunk_size=8, backend=backend)
    monkeypatch.undo()
    assert_close(got, reference_of(args, kw), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_scaling_and_partial_requires_grad(backend, seed):
    args, kw = make_case(seed, 20, 16, 90, torch.float32, opts={"bias": True})
    want = reference_of(args, kw)
    hidden, weight, *rest = args
    w = weight.clone().requires_grad_()
    out = fused_linear_pg_loss(hidden, w, *rest, **kw, chunk_size=8, backend=backend)
    (3.0 * out.loss).backward(retain_graph=True)
    assert rel(w.grad, 3.0 * want["grad_weight"]) <= TOL[torch.float32]
    out.loss.backward()
    assert rel(w.grad, 4.0 * want["grad_weight"]) <= TOL[torch.float32]
    with torch.no_grad():
        nog = fused_linear_pg_loss(hidden, w, *rest, **kw, chunk_size=8, backend=backend)
    assert not nog.loss.requires_grad
    assert_close({"loss": nog.loss}, want, torch.float32, keys=["loss"])   # judged by term scale


@pytest.mark.parametrize("backend", BACKENDS)
def test_input_dtype_variants(backend, seed):
    """int32 targets, a float 0/1 mask, fp16 per-token inputs and a tensor normalizer."""
    args, kw = make_case(seed, 26, 16, 90, torch.float32, opts={"ref": True, "beta": 0.1})
    hidden, weight, targets, old, adv, mask = args
    variant = (hidden, weight, targets.int(), old.half().float(), adv, mask.float())
    kw_var = dict(kw, ref_logp=kw["ref_logp"].half(), normalizer=torch.tensor(9.0))
    got = run(fused_linear_pg_loss, variant[:3] + (old.half(),) + variant[4:], kw_var,
              chunk_size=8, backend=backend)
    assert_close(got, reference_of(variant, dict(kw_var, normalizer=9.0)), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bias_without_grad(backend, seed):
    args, kw = make_case(seed, 20, 16, 90, torch.float32, opts={"bias": True, "temperature": 0.8})
    got = run(fused_linear_pg_loss, args, kw, grad_bias=False, chunk_size=8, backend=backend)
    assert_close(got, reference_of(args, kw, grad_bias=False), torch.float32)


def test_weights_give_sequence_mean_of_token_means(seed):
    """weights = 1/(masked tokens of the row), normalizer = rows with a masked token: the loss
    and its gradient are the mean over sequences of each sequence's token-mean loss."""
    B, L = 4, 7
    args, kw = make_case(seed, B * L, 16, 80, torch.float32, opts={"entropy_coef": 0.01})
    mask = args[5].view(B, L).clone()
    mask[1] = False                                  # a row outside the loss counts for nothing
    mask[3, :2] = True
    lens = mask.sum(1, keepdim=True).clamp(min=1).float()
    weights = (1.0 / lens).expand(B, L).reshape(-1)
    rows = int((mask.sum(1) > 0).sum())
    args = args[:5] + (mask.view(-1),)
    got = run(fused_linear_pg_loss, args, kw, weights=weights, normalizer=float(rows),
              chunk_size=8, backend="torch")
    want_loss, want_grad = 0.0, torch.zeros_like(got["grad_hidden"], dtype=torch.float64)
    for b in range(B):
        if mask[b].any():
            row_mask = torch.zeros(B, L, dtype=torch.bool)
            row_mask[b] = mask[b]
            one = reference_of(args[:5] + (row_mask.view(-1),), kw)   # token mean of row b
            want_loss += float(one["loss"]) / rows
            want_grad += one["grad_hidden"] / rows
    assert abs(float(got["loss"]) - want_loss) <= 1e-5 * max(1.0, abs(want_loss))
    assert rel(got["grad_hidden"], want_grad) <= TOL[torch.float32]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_on_policy_old_logp_none(backend, dtype, seed):
    """old_logp=None: pi_old = pi (rho = 1, nothing clipped); as the reference, and as passing
    the current log-probs explicitly."""
    args, kw = make_case(seed, 33, 16, 120, dtype, opts={"ref": True, "beta": 0.05, "entropy_coef": 0.01,
                                                       "roll": True, "tis_cap": 1.5, "weights": True})
    on_policy = args[:3] + (None,) + args[4:]
    got = run(fused_linear_pg_loss, on_policy, kw, chunk_size=8, backend=backend)
    want = reference_of(on_policy, kw)
    assert_close(got, want, dtype)
    assert float(got["clip_frac"]) == 0.0
    explicit = args[:3] + (got["logp"].float(),) + args[4:]
    assert_close(run(fused_linear_pg_loss, explicit, kw, chunk_size=8, backend=backend), want, dtype)


# --------------------------------------------------------------------------- forward only
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_logprobs_forward_only(backend, dtype, seed):
    args, kw = make_case(seed, 45, 32, 230, dtype, opts={"bias": True, "temperature": 0.7})
    hidden, weight, targets = args[:3]
    h = hidden.clone().requires_grad_()
    logp, ent = fused_linear_logprobs(h, weight, targets, bias=kw["bias"], temperature=0.7,
                                      return_entropy=True, chunk_size=16, backend=backend)
    assert not logp.requires_grad and logp.dtype == torch.float32 and ent.shape == (45,)
    want_lp, want_ent = logprobs_reference(hidden.double(), weight.double(), targets,
                                           bias=kw["bias"].double(), temperature=0.7,
                                           return_entropy=True)
    assert rel(logp, want_lp) <= TOL[dtype] and rel(ent, want_ent) <= TOL[dtype]
    only = fused_linear_logprobs(hidden, weight, targets, bias=kw["bias"], temperature=0.7,
                                 backend=backend)
    assert torch.equal(only, logp)


# --------------------------------------------------------------------------- GRPO "dapo"
@pytest.mark.parametrize("backend", BACKENDS)
def test_one_advantage_per_sequence_equals_grpo_dapo_loss(backend, seed):
    """TRL GRPOTrainer, loss_type="dapo", beta=0: token mean over all completion tokens."""
    B, L, H, V, temp = 5, 11, 16, 97, 0.9
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, L, H, generator=g)
    weight = torch.randn(V, H, generator=g) / 2.0
    ids = torch.randint(0, V, (B, L), generator=g)
    lengths = torch.tensor([11, 3, 7, 1, 9])
    completion_mask = (torch.arange(L)[None] < lengths[:, None]).float()
    seq_adv = torch.randn(B, generator=g)
    old = torch.randn(B, L, generator=g) * 0.3 - math.log(V)

    h = hidden.clone().requires_grad_()
    logits = (h @ weight.t()) / temp                                  # materialised (B, L, V)
    per_token_logps = torch.log_softmax(logits, -1).gather(-1, ids[..., None])[..., 0]
    coef_1 = torch.exp(per_token_logps - old)
    coef_2 = torch.clamp(coef_1, 1 - 0.2, 1 + 0.28)
    per_token_loss = -torch.min(coef_1 * seq_adv[:, None], coef_2 * seq_adv[:, None])
    dapo = (per_token_loss * completion_mask).sum() / completion_mask.sum().clamp(min=1.0)
    dapo.backward()

    h2 = hidden.clone().requires_grad_()
    out = fused_linear_pg_loss(h2.view(-1, H), weight, ids.view(-1), old.view(-1),
                               seq_adv[:, None].expand(B, L).reshape(-1),
                               completion_mask.view(-1), eps_low=0.2, eps_high=0.28,
                               temperature=temp, chunk_size=16, backend=backend)
    out.loss.backward()
    # the loss is a signed sum that can cancel: its error is judged against its terms' size
    terms = per_token_loss.detach().abs().mul(completion_mask).sum() / completion_mask.sum()
    scale = max(abs(float(dapo)), float(terms))
    assert abs(float(out.loss) - float(dapo)) <= TOL[torch.float32] * scale
    assert rel(h2.grad, h.grad) <= TOL[torch.float32]


# --------------------------------------------------------------------------- memory
class _LargestFloatTensor(TorchDispatchMode):
    """Records the largest floating-point tensor any aten op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_full_logits_tensor(backend, seed):
    N, H, V, chunk = 192, 8, 256, 16
    args, kw = make_case(seed, N, H, V, torch.float32, opts={"ref": True, "beta": 0.1,
                                                             "entropy_coef": 0.01})
    hidden, weight, *rest = args
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    spy = _LargestFloatTensor()
    with spy:
        out = fused_linear_pg_loss(h, w, *rest, **kw, chunk_size=chunk, backend=backend)
        out.loss.backward()
    assert spy.largest <= max(chunk * V, V * H, N * H), spy.largest
    # the spy does see a materialised (N, V) tensor when there is one
    naive = _LargestFloatTensor()
    with naive:
        pg_loss_reference(h, w, *rest, **kw).loss.backward()
    assert naive.largest >= N * V


# --------------------------------------------------------------------------- bad input
def _bad_cases():
    args, kw = make_case(3, 6, 4, 10, torch.float32)
    h, w, y, old, adv, mask = args
    ok = dict(hidden=h, weight=w, targets=y, old_logp=old, advantages=adv, loss_mask=mask)
    meta = torch.empty(6, device="meta")
    return [
        ("hidden int", dict(ok, hidden=h.long()), TypeError, "hidden"),
        ("hidden 3-d", dict(ok, hidden=h[None]), ValueError, "hidden"),
        ("weight H", dict(ok, weight=w[:, :3]), ValueError, "weight"),
        ("dtype mix", dict(ok, weight=w.double()), TypeError, "weight"),
        ("float targets", dict(ok, targets=y.float()), TypeError, "targets"),
        ("targets N", dict(ok, targets=y[:5]), ValueError, "targets"),
        ("targets range", dict(ok, targets=y + 10), ValueError, "targets"),
        ("old shape", dict(ok, old_logp=old[:, None]), ValueError, "old_logp"),
        ("adv int", dict(ok, advantages=adv.long()), TypeError, "advantages"),
        ("mask shape", dict(ok, loss_mask=mask[:4]), ValueError, "loss_mask"),
        ("not a tensor", dict(ok, advantages=[0.0] * 6), TypeError, "advantages"),
        ("device mix", dict(ok, advantages=meta), TypeError, "device"),
        ("backend", dict(ok, backend="cuda"), ValueError, "backend"),
        ("triton fp64", dict(ok, hidden=h.double(), weight=w.double(), backend="triton"),
         TypeError, "float64"),
        ("beta w/o ref", dict(ok, beta=0.1), ValueError, "ref_logp"),
        ("tis w/o rollout", dict(ok, tis_cap=2.0), ValueError, "rollout_logp"),
        ("dual clip <= 1", dict(ok, dual_clip=1.0), ValueError, "dual_clip"),
        ("temperature", dict(ok, temperature=0.0), ValueError, "temperature"),
        ("normalizer", dict(ok, normalizer=-1.0), ValueError, "normalizer"),
        ("chunk_size", dict(ok, chunk_size=0), ValueError, "chunk_size"),
        ("bias dtype", dict(ok, bias=torch.zeros(10, dtype=torch.float64)), TypeError, "bias"),
        ("weights shape", dict(ok, weights=torch.ones(5)), ValueError, "weights"),
        ("weights int", dict(ok, weights=torch.ones(6, dtype=torch.long)), TypeError, "weights"),
    ]


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_bad_input_raises_clear_error(case):
    _, kwargs, exc, word = case
    with pytest.raises(exc, match=word):
        fused_linear_pg_loss(**kwargs)


def test_logprobs_bad_input():
    args, _ = make_case(5, 6, 4, 10, torch.float32)
    with pytest.raises(TypeError, match="targets"):
        fused_linear_logprobs(args[0], args[1], args[2].float())
    with pytest.raises(ValueError, match="backend"):
        fused_linear_logprobs(*args[:3], backend="bogus")


def test_reference_backend_is_accepted_like_k1_and_k2():
    """Every kernel takes the same backend names: K3's "reference" is the plain math."""
    args, kw = make_case(7, 6, 4, 10, torch.float32)
    torch.testing.assert_close(fused_linear_logprobs(*args[:3], backend="reference"),
                               fused_linear_logprobs(*args[:3], backend="torch"))
    ref = fused_linear_pg_loss(*args, **kw, backend="reference")
    got = fused_linear_pg_loss(*args, **kw, backend="torch")
    torch.testing.assert_close(ref.loss, got.loss)
    torch.testing.assert_close(ref.logp, got.logp)


@pytest.mark.gpu
def test_cpu_cuda_mix_raises():
    args, _ = make_case(6, 6, 4, 10, torch.float32)
    with pytest.raises(TypeError, match="device"):
        fused_linear_pg_loss(args[0].cuda(), *args[1:])


def test_public_exports():
    for name in ("fused_linear_pg_loss", "fused_linear_logprobs", "PGLossOutput"):
        assert name in tspo_kernels.__all__
    assert pg_mod.PGLossOutput._fields == OUTPUTS


# --------------------------------------------------------------------------- GPU compile
_COMPILE_SCRIPT = r"""
import os
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from tspo_kernels.pg_loss import _pg_rows_kernel as kernel

flags = ("HAS_LOSS", "HAS_REF", "HAS_DUAL", "HAS_TIS", "HAS_W", "HAS_OLD", "WRITE_GRAD", "STATS")
for logits_type, on in (("*bf16", True), ("*fp32", False), ("*fp16", True)):
    sig = {}
    for name in kernel.arg_names:
        if name in flags or name in ("BLOCK_V", "UNIT"):
            sig[name] = "constexpr"
        elif name == "logits_ptr":
            sig[name] = logits_type
        elif name.endswith("_ptr"):
            sig[name] = {"targets_ptr": "*i64", "mask_ptr": "*i8"}.get(name, "*fp32")
        else:
            sig[name] = "i32" if name in ("stride_row", "V", "n_units") else "fp32"
    const = {(kernel.arg_names.index(f),): on for f in flags}
    const[(kernel.arg_names.index("BLOCK_V"),)] = 4096
    const[(kernel.arg_names.index("UNIT"),)] = 64 if on else 1
    out = triton.compile(ASTSource(kernel, sig, constexprs=const),
                         target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
    assert len(out.asm["cubin"]) > 0
print("compiled")
"""


def test_kernel_compiles_for_hopper():
    """The interpreter accepts more than the compiler: compile the row kernel for sm_90
    (Triton's bundled ptxas; no GPU needed) with every option on and off."""
    import triton.backends

    if "nvidia" not in triton.backends.backends:
        pytest.skip("this Triton build has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-3000:]


# --------------------------------------------------------------------------- gradient-filtered path
#: small filter tiles, so that the interpreter runs many tiles of a small problem quickly
SMALL_TILES = {"dh": (32, 16), "dw": (16, 32)}


@pytest.fixture
def small_tiles(monkeypatch):
    monkeypatch.setattr(pg_mod, "FILTER_TILES", SMALL_TILES)
    monkeypatch.setattr(pg_mod, "FILTER_BLOCK_H", 16)


def peaked_case(seed, N=96, H=24, V=400, zipf=2.5):
    """Inputs whose softmax mass sits on few tokens (a Zipf-shaped bias through a constant hidden
    column, token frequency ranks in random order), as a trained LM's does: most vocabulary
    tiles of d loss / d logits are tiny, so the filter has something to skip."""
    args, kw = make_case(seed, N, H, V, torch.float32, opts={"ref": True, "beta": 0.05, "entropy_coef": 0.01})
    hidden, weight, targets, old, adv, mask = args
    g = torch.Generator().manual_seed(seed + 1)
    rank = torch.randperm(V, generator=g).double() + 1.0
    hidden, weight = hidden.clone(), weight.clone()
    hidden[:, 0] = 1.0
    weight[:, 0] = (-zipf * torch.log(rank)).float()
    with torch.no_grad():                      # targets drawn from the model, old log-probs near it
        logits = hidden.double() @ weight.double().t()
        targets = torch.multinomial(torch.softmax(logits, -1), 1, generator=g).squeeze(1)
        lp = torch.log_softmax(logits, -1).gather(1, targets[:, None]).squeeze(1).float()
    # the 16-bit margin: test_filtered_matches_dense_in_bf16 runs these inputs in bf16
    old = lp - _away(0.3 * torch.randn(N, generator=g), [math.log(0.8), math.log(1.2)], MARGIN[torch.bfloat16])
    kw["ref_logp"] = lp + 0.5 * torch.randn(N, generator=g)
    return (hidden, weight, targets, old, adv, mask), kw


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("vocab_order", ["mean_logit", None])
@pytest.mark.parametrize("dense_above", [0.75, 1.0])
def test_filtered_threshold_zero_is_the_dense_result(backend, vocab_order, dense_above, small_tiles, seed):
    """Threshold 0 keeps every tile with any mass: the filtered path computes the dense gradients,
    through the dense products (every chunk keeps more than ``filter_dense_above`` = 0.75 of its
    tiles) or, with 1, through the block-sparse kernels over every tile."""
    args, kw = make_case(seed, 45, 16, 150, torch.float32, opts=OPTION_SETS["all"])
    got = run(fused_linear_pg_loss, args, kw, chunk_size=16, backend=backend, backward="filtered",
              filter_threshold=0.0, vocab_order=vocab_order, filter_stats=True, filter_dense_above=dense_above)
    stats = got["filter_stats"].as_dict()
    assert_close(got, reference_of(args, kw), torch.float32)
    assert float(stats["skipped_dh"]) == 0.0 and float(stats["skipped_dw"]) == 0.0
    assert stats["chunks"] == 3 and stats["dense_chunks"] == (3 if dense_above < 1 else 0)


def test_filtered_dense_above_is_checked():
    args, kw = make_case(1302, 8, 16, 40, torch.float32)
    for bad in (1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match="filter_dense_above"):
            fused_linear_pg_loss(*args, **kw, backward="filtered", filter_dense_above=bad, backend="torch")


@pytest.mark.parametrize("backend", BACKENDS)
def test_filtered_skips_tiles_within_its_error_bound(backend, small_tiles, seed):
    """At thresholds 2^-12, 2^-8 and 2^-4 the filter skips a growing share of the tiles; the
    forward outputs are the dense ones, and the gradients' total error against the float64
    reference stays within the bound the call reports (the dropped sum |d loss / d logits| times
    the other factor's largest row 1-norm), plus fp32 rounding."""
    args, kw = peaked_case(seed)
    want = reference_of(args, kw)
    hidden, weight, _, _, _, mask = args
    w_row = float(weight.double().abs().sum(1).max())
    h_row = float(hidden.double()[mask].abs().sum(1).max())
    skipped = []
    for threshold in (2.0 ** -12, 2.0 ** -8, 2.0 ** -4):
        got = run(fused_linear_pg_loss, args, kw, chunk_size=48, backend=backend, backward="filtered",
                  filter_threshold=threshold, filter_stats=True, filter_dense_above=1.0)   # always the sparse path
        stats = got["filter_stats"].as_dict()
        assert_close(got, want, torch.float32, keys=["loss", "logp", "entropy", "kl", "clip_frac"])
        for g_key, bound_key, row in (("grad_hidden", "dropped_l1_bound_dh", w_row),
                                      ("grad_weight", "dropped_l1_bound_dw", h_row)):
            err = float((got[g_key].double() - want[g_key]).abs().sum())
            slack = 1e-5 * float(want[g_key].abs().sum())            # fp32 rounding of the kept part
            assert err <= float(stats[bound_key]) * row + slack, (threshold, g_key, err, float(stats[bound_key]))
        skipped.append((float(stats["skipped_dh"]), float(stats["skipped_dw"])))
    # peaked inputs: tiles are skipped (at 2^-12, 13-49% of them over 300 random cases)
    assert skipped[0][0] > 0.05 and skipped[0][1] > 0.05, skipped
    assert skipped == sorted(skipped) and skipped[-1] > skipped[0], skipped   # more with a larger threshold
    # the default threshold drops entries below what a 16-bit product resolves: the gradients stay
    # within the bf16 tolerance of the exact ones (they are not fp32-exact: 2e-3 here)
    got = run(fused_linear_pg_loss, args, kw, chunk_size=48, backend=backend, backward="filtered")
    assert rel(got["grad_hidden"], want["grad_hidden"]) <= TOL[torch.bfloat16]
    assert rel(got["grad_weight"], want["grad_weight"]) <= TOL[torch.bfloat16]


@pytest.mark.parametrize("backend", BACKENDS)
def test_filtered_matches_dense_in_bf16(backend, small_tiles, seed):
    """bf16 inputs: the filtered path (default threshold) is within bf16 tolerance of the float64
    reference, like the dense path."""
    args, kw = peaked_case(seed)
    args = tuple(a.to(torch.bfloat16) if i < 2 else a for i, a in enumerate(args))
    got = run(fused_linear_pg_loss, args, kw, chunk_size=48, backend=backend, backward="filtered")
    assert_close(got, reference_of(args, kw), torch.bfloat16)


@pytest.mark.parametrize("strategy", ["triton", "upcast", "dtype_out"])
def test_weight_gradient_accumulation_strategies(strategy, monkeypatch, seed):
    """16-bit weights over several chunks: the float32 weight-gradient accumulator is filled inside
    the product (cuBLAS dtype_out or the Triton GEMM epilogue on CUDA; an fp32 upcast on CPU);
    every strategy gives the reference's gradient within bf16 tolerance, and the Triton GEMM
    equals the upcast one to fp32 rounding."""
    if strategy == "dtype_out" and not pg_mod._dtype_out_ok(torch.device("cuda" if torch.cuda.is_available()
                                                                          else "cpu"), torch.bfloat16):
        pytest.skip("this torch build has no aten::addmm.dtype_out for bf16 on this device")
    args, kw = make_case(seed, 70, 32, 200, torch.bfloat16, opts={"bias": True, "ref": True, "beta": 0.05})
    monkeypatch.setattr(pg_mod, "_ACC_OVERRIDE", strategy)
    got = run(fused_linear_pg_loss, args, kw, chunk_size=16, backend="torch")
    assert_close(got, reference_of(args, kw), torch.bfloat16)
    monkeypatch.setattr(pg_mod, "_ACC_OVERRIDE", "upcast")
    upcast = run(fused_linear_pg_loss, args, kw, chunk_size=16, backend="torch")
    assert rel(got["grad_weight"], upcast["grad_weight"]) <= 1e-2      # one bf16 rounding of the result apart


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("backward", ["dense", "filtered"])
def test_non_finite_policy(backend, backward, small_tiles, seed):
    """docs/algorithm.md §5, the same on every backend and backward: NaN / inf hidden rows of
    tokens outside the loss change neither the loss nor any gradient; a NaN in an input that
    reaches a loss-masked token (here its ref_logp, beta != 0) makes the loss and the weight
    gradient NaN; a normalizer of 0, < 0 or NaN is refused."""
    args, kw = make_case(seed, 40, 16, 120, torch.float32, opts={"ref": True, "beta": 0.1})
    hidden, weight, targets, old, adv, mask = args
    opts = dict(chunk_size=16, backend=backend, backward=backward)
    clean = run(fused_linear_pg_loss, args, kw, **opts)
    poisoned = hidden.clone()
    out_rows = (~mask).nonzero().flatten()
    poisoned[out_rows[0]] = float("nan")
    poisoned[out_rows[1], 3] = float("inf")
    got = run(fused_linear_pg_loss, (poisoned,) + args[1:], kw, **opts)
    assert torch.isfinite(got["loss"]) and torch.isfinite(got["grad_weight"]).all()
    # fp32 rounding only (the sum may run in another order); the loss is a signed sum that can
    # cancel, so its error is taken against the size of its terms, as in assert_close
    scale = max(abs(float(clean["loss"])), reference_of(args, kw)["loss_scale"])
    assert abs(float(got["loss"]) - float(clean["loss"])) <= 1e-6 * scale
    assert rel(got["grad_weight"], clean["grad_weight"]) <= 1e-6
    assert (got["grad_hidden"][out_rows[:2]] == 0).all()
    in_row = int(mask.nonzero()[0])
    ref = kw["ref_logp"].clone()
    ref[in_row] = float("nan")
    bad = run(fused_linear_pg_loss, args, dict(kw, ref_logp=ref), **opts)
    assert torch.isnan(bad["loss"]) and torch.isnan(bad["grad_weight"]).any()
    for value in (0.0, -1.0, float("nan"), torch.tensor(0.0)):
        with pytest.raises(ValueError, match="normalizer"):
            fused_linear_pg_loss(*args, **kw, normalizer=value, **opts)


@pytest.mark.parametrize("backend", BACKENDS)
def test_filtered_bounds_each_rows_dropped_total_on_high_entropy_rows(backend, small_tiles, seed):
    """Rows whose probability mass is spread wide (entropy above ln 4096: every token's
    probability, about 1/V, is below the threshold 2^-12) would lose their whole soft gradient to
    the per-entry rule alone, a coherent bias.  The row bound keeps tiles until no row drops more
    than rho (|g_lp| + |g_ent|) / T in all (rho = ``FILTER_ROW_BOUND``), so per row t and hidden
    column j: sum_j |err grad_h[t, j]| <= rho s_t sum_j max_v |W_vj|, and per column j:
    sum_v |err grad_W[v, j]| <= rho sum_t s_t |h_tj|.  On-policy, no entropy or KL term: s_t =
    |A_t| / (masked tokens).  Every W row shares a common part c, which the softmax cancels (the
    rows stay near uniform) but which makes a dropped soft gradient, -g_lp sum_v p_v W_v ~ -g_lp c,
    large in grad_h."""
    N, H, V = 24, 16, 8192
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g)
    weight = 1.0 + 0.02 * torch.randn(V, H, generator=g)
    targets = torch.randint(0, V, (N,), generator=g)
    adv, mask = torch.randn(N, generator=g), torch.ones(N, dtype=torch.bool)
    args, kw = (hidden, weight, targets, None, adv, mask), {}
    with torch.no_grad():
        _, ent = logprobs_reference(hidden.double(), weight.double(), targets, return_entropy=True)
    assert float(ent.min()) > math.log(4096), float(ent.min())
    want = reference_of(args, kw)
    got = run(fused_linear_pg_loss, args, kw, chunk_size=N, backend=backend, backward="filtered",
              filter_dense_above=1.0, filter_stats=True)
    stats = got["filter_stats"]
    rho = pg_mod.FILTER_ROW_BOUND
    s = adv.double().abs() / N
    err_h = (got["grad_hidden"].double() - want["grad_hidden"]).abs().sum(1)
    bound_h = rho * s * float(weight.double().abs().amax(0).sum())
    slack_h = 1e-5 * want["grad_hidden"].abs().sum(1) + 1e-12
    assert (err_h <= bound_h + slack_h).all(), (err_h / bound_h).max()
    err_w = (got["grad_weight"].double() - want["grad_weight"]).abs().sum(0)
    bound_w = rho * (s[:, None] * hidden.double().abs()).sum(0)
    slack_w = 1e-5 * want["grad_weight"].abs().sum(0) + 1e-12
    assert (err_w <= bound_w + slack_w).all(), (err_w / bound_w).max()
    assert int(stats.rows_lowered) == N                     # every row needed a lower threshold
    assert float(stats.dropped_l1_bound_dh) <= rho * float(s.sum()) * (1 + 1e-6)
