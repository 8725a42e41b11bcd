"""K3 benchmarks: fused LM head + clipped policy-gradient loss, forward + backward.

CPU (always): the chunked PyTorch path against an eager full-logits loss at a small shape, and
``test_cpu_filtered_lm_like_matches_dense`` (a plain test, not timed): the gradient-filtered
path on LM-like inputs skips tiles and stays within its error bound of the dense path.

CUDA (skipped without a GPU): bf16, H=3584, V=152064 (Qwen2.5-7B's head), N = 16384 and 32768
tokens.  Every K3 variant: the dense path with the weight gradient accumulated by
``aten::addmm.dtype_out`` (``tspo_dense``) and by the Triton GEMM epilogue
(``tspo_dense_triton_acc``, forced through ``pg_loss._ACC_OVERRIDE``), the gradient-filtered
path (``tspo_filtered``: threshold 2^-12, the default; 0, nothing skipped, its worst case, through
the dense fallback of ``filter_dense_above`` and, ``_sparse``, through the block-sparse kernels;
2^-8) and the forward-only log-probs (``tspo_logprobs``), on two kinds of inputs: "uniform"
(``make_inputs``: random h and W, logits about N(0, 1)) and "lm_like" (``lm_like.py``: a
Zipf-biased low-rank head, per-token entropy and top-1 probability like a trained LM's).
Against them: the three matrix products alone (``matmul_floor``, per kind of input), one
product (``one_product``, the log-probs' floor), eager PyTorch, torch.compile of it,
liger-kernel's ``LigerFusedLinearGRPOLoss`` and ``triton_grpo_loss`` (when importable).
``benchmark.extra_info`` gets ``peak_extra_GiB`` (peak CUDA memory during one call above the
inputs, the gradients of h and W included), the variant, the kind of inputs, the chunk rows,
the accumulation strategy and, for the filtered path, the skipped fractions and rows lowered by
the row bound from ``PGLossOutput.filter_stats``.  ``bench/device_check.sh`` runs them and prints the ratios to the floor.

    pytest bench/test_bench_pg_loss.py --benchmark-only
"""
import math

import pytest
import torch
from lm_like import make_lm_like_inputs
from torch.utils._python_dispatch import TorchDispatchMode

from tspo_kernels import fused_linear_logprobs, fused_linear_pg_loss
from tspo_kernels import pg_loss as pg_mod

HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device; none is present")
CPU_SHAPE = dict(N=512, H=256, V=8192)
GPU_H, GPU_V = 3584, 152064
GPU_TOKENS = [16384, 32768]
SEQ_LEN = 1024          # tokens per sequence when a baseline wants (B, T) inputs


def make_inputs(N, H, V, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    hidden = torch.randn(N, H, generator=g).to(device=device, dtype=dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=g) / math.sqrt(H)).to(device=device, dtype=dtype)
    weight.requires_grad_()
    targets = torch.randint(0, V, (N,), generator=g).to(device)
    old = (-math.log(V) + 0.5 * torch.randn(N, generator=g)).to(device)
    adv = torch.randn(N, generator=g).to(device)
    mask = (torch.rand(N, generator=g) < 0.8).to(device)
    return hidden, weight, targets, old, adv, mask


def eager_loss(hidden, weight, targets, old, adv, mask, eps=0.2):
    """What a trainer does without a fused kernel: (N, V) float32 logits, log_softmax, gather."""
    logits = (hidden @ weight.t()).float()
    logp = torch.log_softmax(logits, dim=-1).gather(1, targets[:, None])[:, 0]
    rho = torch.exp(logp - old)
    pg = torch.maximum(-rho * adv, -rho.clamp(1 - eps, 1 + eps) * adv)
    m = mask.float()
    return (pg * m).sum() / m.sum().clamp(min=1.0)


def step(loss_fn, inputs, sync):
    """One forward + backward with fresh gradients."""
    hidden, weight = inputs[0], inputs[1]
    hidden.grad = weight.grad = None
    loss_fn(*inputs).backward()
    if sync:
        torch.cuda.synchronize()


def peak_extra_gib(fn, inputs=()):
    """Peak CUDA memory during one call of ``fn`` above what was allocated before it, in GiB.
    The gradients of the leaf tensors in ``inputs`` are dropped first, so the figure is above
    the inputs alone and includes the gradients the call creates."""
    for t in inputs:
        if isinstance(t, torch.Tensor) and t.is_leaf:
            t.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


class _LargestTensor(TorchDispatchMode):
    """Largest tensor (in bytes) any aten op returns: a device-independent memory figure."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


def largest_tensor_mib(fn):
    spy = _LargestTensor()
    with spy:
        fn()
    return round(spy.largest / 2**20, 2)


# --------------------------------------------------------------------------- CPU
@pytest.mark.benchmark(group="k3-cpu-fwd-bwd")
@pytest.mark.parametrize("impl", ["fused_torch_path", "eager_full_logits"])
def test_cpu_pg_loss_fwd_bwd(benchmark, impl):
    inputs = make_inputs(**CPU_SHAPE, dtype=torch.float32, device="cpu")
    fn = eager_loss if impl == "eager_full_logits" else (
        lambda *a: fused_linear_pg_loss(*a, backend="torch").loss)
    benchmark.extra_info.update(CPU_SHAPE, dtype="float32", impl=impl, threads=torch.get_num_threads(),
                                largest_tensor_MiB=largest_tensor_mib(lambda: step(fn, inputs, False)))
    benchmark(step, fn, inputs, False)


@pytest.mark.benchmark(group="k3-cpu-logprobs")
@pytest.mark.parametrize("impl", ["fused_torch_path", "eager_full_logits"])
def test_cpu_logprobs(benchmark, impl):
    hidden, weight, targets, *_ = make_inputs(**CPU_SHAPE, dtype=torch.float32, device="cpu")

    def eager():
        with torch.no_grad():
            return torch.log_softmax((hidden @ weight.t()).float(), -1).gather(1, targets[:, None])

    fused = lambda: fused_linear_logprobs(hidden, weight, targets, backend="torch")
    benchmark.extra_info.update(CPU_SHAPE, dtype="float32", impl=impl)
    benchmark(eager if impl == "eager_full_logits" else fused)


@pytest.mark.benchmark(group="k3-triton-interpreter")
@pytest.mark.skipif(not HAS_CUDA, reason="on CPU the Triton kernel runs in the interpreter: "
                    "its timing says nothing about the kernel (tests/test_pg_loss.py checks it)")
def test_triton_small(benchmark):
    inputs = make_inputs(**CPU_SHAPE, dtype=torch.float32, device="cuda")
    benchmark(step, lambda *a: fused_linear_pg_loss(*a, backend="triton").loss, inputs, True)


# --------------------------------------------------------------------------- CPU: the filter on LM-like inputs
LM_CPU_SHAPE = dict(N=256, H=128, V=32768)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_cpu_filtered_lm_like_matches_dense():
    """The gradient-filtered path (PyTorch backend) on LM-like inputs (``lm_like.py``, bf16 values):
    at the default threshold it skips a nonzero fraction of the tiles, its gradients stay within
    the error bound it reports and within bf16's tolerance (2e-2 by norm, as in
    tests/test_pg_loss.py) of the dense path's; at threshold 0 it keeps every tile and gives the
    dense result.  The arithmetic is float64, so the only difference is what the filter drops."""
    h16, w16, y, old, adv, mask = make_lm_like_inputs(**LM_CPU_SHAPE, dtype=torch.bfloat16, device="cpu", seed=3)

    def run(**kw):
        h = h16.detach().double().requires_grad_()
        w = w16.detach().double().requires_grad_()
        out = fused_linear_pg_loss(h, w, y, old, adv, mask, backend="torch", **kw)
        out.loss.backward()
        return out, h.grad, w.grad

    dense, gh_d, gw_d = run()
    # the block-sparse route (dense_above 1): at this reduced size the default 0.75 would run the
    # dense products, since fewer tiles are skipped than at V = 152064 (bench/RESULTS.md)
    filt, gh_f, gw_f = run(backward="filtered", filter_stats=True, filter_dense_above=1.0)
    stats = filt.filter_stats.as_dict()
    skipped = float(stats["skipped_fraction"])
    assert 0.0 < skipped < 1.0, stats
    assert 0.0 < float(stats["skipped_dh"]) and 0.0 < float(stats["skipped_dw"]), stats
    for k in ("loss", "logp", "entropy", "kl", "clip_frac"):          # the same forward
        torch.testing.assert_close(getattr(filt, k), getattr(dense, k), rtol=1e-10, atol=1e-12)
    # sum |error| <= (bound on the dropped sum |dlogits|) x (largest row 1-norm of the other factor)
    w64, h64 = w16.detach().double(), h16.detach().double()
    bound_h = float(stats["dropped_l1_bound_dh"]) * float(w64.abs().sum(1).max())
    bound_w = float(stats["dropped_l1_bound_dw"]) * float(h64[mask].abs().sum(1).max())
    err_h, err_w = float((gh_f - gh_d).abs().sum()), float((gw_f - gw_d).abs().sum())
    assert err_h <= bound_h * (1 + 1e-9) + 1e-12, (err_h, bound_h)
    assert err_w <= bound_w * (1 + 1e-9) + 1e-12, (err_w, bound_w)
    assert _rel(gh_f, gh_d) <= 2e-2 and _rel(gw_f, gw_d) <= 2e-2, (_rel(gh_f, gh_d), _rel(gw_f, gw_d))

    none, gh_0, gw_0 = run(backward="filtered", filter_threshold=0.0, filter_stats=True)
    assert float(none.filter_stats.skipped_fraction) == 0.0
    assert _rel(gh_0, gh_d) <= 1e-10 and _rel(gw_0, gw_d) <= 1e-10


# --------------------------------------------------------------------------- CUDA
def _liger_fused_linear(inputs):
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    hidden, weight, targets, old, adv, mask = inputs
    B = hidden.shape[0] // SEQ_LEN
    mod = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, loss_type="dapo",
                                   epsilon_low=0.2, epsilon_high=0.2)
    seq_adv = adv.view(B, SEQ_LEN)[:, 0].contiguous()   # liger takes one advantage per sequence

    def loss_fn(h, w, *_):
        out = mod(h.view(B, SEQ_LEN, -1), w, targets.view(B, SEQ_LEN), mask.view(B, SEQ_LEN),
                  seq_adv, old_per_token_logps=old.view(B, SEQ_LEN))
        return out[0] if isinstance(out, tuple) else out

    return loss_fn


def _liger_triton_grpo(inputs):
    from liger_kernel.transformers.grpo_loss import triton_grpo_loss

    hidden, weight, targets, old, adv, mask = inputs
    B = hidden.shape[0] // SEQ_LEN
    T = SEQ_LEN - 1                    # it takes (B, T+1, V) logits and drops the last position
    seq_adv = adv.view(B, SEQ_LEN)[:, 0].contiguous()

    def loss_fn(h, w, *_):
        logits = (h @ w.t()).view(B, SEQ_LEN, -1)
        out = triton_grpo_loss(logits, old.view(B, SEQ_LEN)[:, :T].contiguous(), None,
                               targets.view(B, SEQ_LEN)[:, :T].contiguous(), seq_adv,
                               mask.view(B, SEQ_LEN)[:, :T].float().contiguous(), temperature=1.0,
                               beta=0.0, eps_low=0.2, eps_high=0.2, loss_type="dapo", reduce=True)
        return out[0] if isinstance(out, tuple) else out

    return loss_fn


class _ThreeProducts(torch.autograd.Function):
    """The floor: logits = h W^T, then grad_h = logits W and grad_W = logits^T h (no softmax,
    no loss; the logits stand in for their gradient)."""

    @staticmethod
    def forward(ctx, h, w):
        logits = h @ w.t()
        ctx.save_for_backward(logits, h, w)
        return logits[0, 0].float()

    @staticmethod
    def backward(ctx, g):
        logits, h, w = ctx.saved_tensors
        return logits @ w, logits.t() @ h


def _matmul_floor(h, w, *_):
    return _ThreeProducts.apply(h, w)


THRESHOLD = 2.0 ** -12          # the filtered path's default
#: fwd+bwd cases, in the order they run (a run cut short keeps the first ones): (variant, inputs,
#: options).  "acc": the dense path's weight-gradient accumulation; "threshold": the filtered path's.
FWD_BWD_CASES = [
    ("matmul_floor", "uniform", {}),
    ("tspo_dense", "uniform", {"acc": "dtype_out"}),
    ("tspo_dense_triton_acc", "uniform", {"acc": "triton"}),
    ("tspo_filtered", "uniform", {"threshold": THRESHOLD}),
    ("tspo_filtered_noskip", "uniform", {"threshold": 0.0}),
    ("tspo_filtered_noskip_sparse", "uniform", {"threshold": 0.0, "dense_above": 1.0}),
    ("matmul_floor", "lm_like", {}),
    ("tspo_dense", "lm_like", {"acc": "dtype_out"}),
    ("tspo_filtered", "lm_like", {"threshold": THRESHOLD}),
    ("tspo_filtered_t8", "lm_like", {"threshold": 2.0 ** -8}),
    ("eager", "uniform", {}),
    ("compiled_eager", "uniform", {}),
    ("liger_fused_linear_grpo", "uniform", {}),
    ("liger_triton_grpo_loss", "uniform", {}),
]
#: baselines that take seconds a call or compile for a minute: fewer rounds
SLOW = ("eager", "compiled_eager", "liger_fused_linear_grpo", "liger_triton_grpo_loss")
_CUDA_INPUTS: dict = {}


def cuda_inputs(kind, N):
    """The GPU-shape inputs of one kind, built once per session and kept (a few GiB in all; the
    uniform ones from the CPU generator as before, the LM-like ones from the GPU's; the
    LM-like statistics go to ``_LM_STATS``)."""
    key = (kind, N)
    if key not in _CUDA_INPUTS:
        if kind == "uniform":
            _CUDA_INPUTS[key] = make_inputs(N, GPU_H, GPU_V, torch.bfloat16, "cuda")
        else:
            stats = {}
            _CUDA_INPUTS[key] = make_lm_like_inputs(N, GPU_H, GPU_V, torch.bfloat16, "cuda", seed=0, stats=stats)
            _LM_STATS[N] = stats
    return _CUDA_INPUTS[key]


_LM_STATS: dict = {}


@pytest.fixture
def acc_override(monkeypatch):
    """Force the dense path's float32 weight-gradient accumulation (``pg_loss._ACC_OVERRIDE``:
    "dtype_out", "triton" or "upcast") for one test; monkeypatch restores the module's value
    when the test ends, pass or fail."""
    def force(strategy):
        monkeypatch.setattr(pg_mod, "_ACC_OVERRIDE", strategy)
    return force


def _chunk_info(N, backward, grads=True):
    """Chunk rows and chunk count the call will use (the module's own rule; information only)."""
    elem = 2
    kw = dict(device="cuda", elem=elem)
    if grads:
        kw.update(need_h=True, need_w=True, weight_half=True)
    if backward == "filtered":
        kw.update(pg_mod._filter_memory(GPU_V, GPU_H, elem, ordered=True))
    try:
        rows = pg_mod._chunk_rows(None, N, GPU_H, GPU_V, **kw)
    except Exception:  # a private helper: its signature may change
        return {}
    return {"chunk_rows": rows, "chunks": -(-N // rows)}


def _loss_fn(impl, inputs, opts, info, acc_override=None):
    """The loss function of one case; fills ``info`` with what identifies the variant."""
    if impl.startswith("tspo_dense"):
        dev = torch.device("cuda")
        want = opts["acc"]
        if want == "dtype_out" and not pg_mod._dtype_out_ok(dev, torch.bfloat16):
            pytest.skip("this torch has no working aten::addmm.dtype_out on CUDA: the dense path uses the Triton "
                        "epilogue (tspo_dense_triton_acc)")
        acc_override(want)
        info.update(acc_strategy=pg_mod._acc_strategy(dev, torch.bfloat16), backward="dense",
                    **_chunk_info(inputs[0].shape[0], "dense"))
        return lambda *a: fused_linear_pg_loss(*a, backend="triton").loss
    if impl.startswith("tspo_filtered"):
        # filter_stats costs a few extra elementwise ops per chunk: the untimed calls (warm-up,
        # peak memory) collect them, the timed rounds run without (test_cuda_pg_loss_fwd_bwd)
        stats = info.setdefault("_filter_stats", {"on": True, "stats": {}})
        thr, da = opts["threshold"], opts.get("dense_above", 0.75)
        info.update(backward="filtered", threshold=thr, dense_above=da, **_chunk_info(inputs[0].shape[0], "filtered"))

        def loss(*a):
            out = fused_linear_pg_loss(*a, backend="triton", backward="filtered", filter_threshold=thr,
                                       filter_dense_above=da, filter_stats=stats["on"])
            if out.filter_stats is not None:
                stats["stats"] = out.filter_stats.as_dict()
            return out.loss

        return loss
    if impl == "eager":
        return eager_loss
    if impl == "compiled_eager":
        return torch.compile(eager_loss)
    if impl == "matmul_floor":
        return _matmul_floor
    make = _liger_fused_linear if impl == "liger_fused_linear_grpo" else _liger_triton_grpo
    try:
        return make(inputs)
    except ImportError as exc:
        pytest.skip(f"liger-kernel not importable: {exc}")


def _filter_info(stats):
    """Skipped fractions and bounds of the last filtered call (0-dim tensors -> floats)."""
    out = {}
    for k in ("skipped_fraction", "skipped_dh", "skipped_dw", "dropped_l1_bound_dh", "dropped_l1_bound_dw",
              "row_scale_l1", "rows_lowered"):
        if k in stats:
            out[k] = round(float(stats[k]), 6)
    for k in ("tiles_dh", "tiles_dw"):
        if k in stats:
            out[k] = int(stats[k])
    return out


def _case_id(case):
    impl, kind, _ = case
    return f"{impl}-{kind}"


@needs_cuda
@pytest.mark.benchmark(group="k3-cuda-logprobs")
@pytest.mark.parametrize("impl", ["tspo_logprobs", "one_product"])
@pytest.mark.parametrize("N", GPU_TOKENS)
def test_cuda_logprobs(benchmark, impl, N):
    """Forward-only log pi(targets) (``fused_linear_logprobs``) against its floor, one product
    ``h W^T`` into a fresh (N, V) bf16 tensor."""
    hidden, weight, targets, *_ = inputs = cuda_inputs("uniform", N)

    def run():
        with torch.no_grad():
            if impl == "one_product":
                out = hidden @ weight.t()
            else:
                out = fused_linear_logprobs(hidden, weight, targets, backend="triton")
        torch.cuda.synchronize()
        return out

    run()
    info = dict(N=N, H=GPU_H, V=GPU_V, dtype="bfloat16", impl=impl, inputs="uniform",
                device=torch.cuda.get_device_name())
    if impl == "tspo_logprobs":
        info.update(_chunk_info(N, "dense", grads=False))
    info["peak_extra_GiB"] = round(peak_extra_gib(run, inputs), 3)
    benchmark.extra_info.update(info)
    benchmark.pedantic(run, rounds=5, warmup_rounds=1)


@needs_cuda
@pytest.mark.benchmark(group="k3-cuda-fwd-bwd")
@pytest.mark.parametrize("case", FWD_BWD_CASES, ids=_case_id)
@pytest.mark.parametrize("N", GPU_TOKENS)
def test_cuda_pg_loss_fwd_bwd(benchmark, acc_override, case, N):
    """One forward + backward per call (fresh gradients; ends in a device sync): a warm-up call
    (compilation), one call for the peak memory (the filtered path's skipped fractions come from
    it), then 5 timed rounds (3 for the slow baselines; the filtered path without filter_stats)."""
    impl, kind, opts = case
    inputs = cuda_inputs(kind, N)
    info = dict(N=N, H=GPU_H, V=GPU_V, dtype="bfloat16", impl=impl, inputs=kind,
                device=torch.cuda.get_device_name())
    fn = _loss_fn(impl, inputs, opts, info, acc_override)
    stats = info.pop("_filter_stats", None)
    try:
        step(fn, inputs, True)                                   # warm-up / compile
        peak = peak_extra_gib(lambda: step(fn, inputs, True), inputs)
    except torch.cuda.OutOfMemoryError as exc:
        pytest.skip(f"{impl} runs out of memory at N={N}: {str(exc).splitlines()[0]}")
    info["peak_extra_GiB"] = round(peak, 3)
    if stats is not None:
        info.update(_filter_info(stats["stats"]))
        stats["on"] = False                                      # timed without filter_stats
    if kind == "lm_like" and N in _LM_STATS:
        s = _LM_STATS[N]
        info.update(entropy_median=round(s["entropy"]["deciles"][4], 3),
                    top1_median=round(s["top1"]["deciles"][4], 3),
                    entropy_deciles=[round(x, 3) for x in s["entropy"]["deciles"]])
    benchmark.extra_info.update(info)
    rounds = 3 if impl in SLOW else 5
    benchmark.pedantic(step, args=(fn, inputs, True), rounds=rounds, warmup_rounds=0)
    inputs[0].grad = inputs[1].grad = None
