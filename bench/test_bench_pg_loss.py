"""K3 benchmarks: fused LM head + clipped policy-gradient loss, forward + backward.

CPU (always): the chunked PyTorch path against an eager full-logits loss at a small shape.
CUDA (skipped without a GPU): bf16, H=3584, V=152064 (Qwen2.5-7B's head), N = 16384 and 32768
tokens, against eager PyTorch, torch.compile of it, liger-kernel's ``LigerFusedLinearGRPOLoss``
and ``triton_grpo_loss`` (when importable), and the three matrix products alone (the floor).
Peak memory above the inputs goes to ``benchmark.extra_info["peak_extra_GiB"]`` on CUDA.

    pytest bench/test_bench_pg_loss.py --benchmark-only
"""
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tspo_kernels import fused_linear_logprobs, fused_linear_pg_loss

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


def peak_extra_gib(fn):
    """Peak CUDA memory above what was allocated before one call of ``fn``, in GiB."""
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

    fused = lambda: fused_linear_logprobs(hidden, weight, targets, backend="torch")  # noqa: E731
    benchmark.extra_info.update(CPU_SHAPE, dtype="float32", impl=impl)
    benchmark(eager if impl == "eager_full_logits" else fused)


@pytest.mark.benchmark(group="k3-triton-interpreter")
@pytest.mark.skipif(not HAS_CUDA, reason="on CPU the Triton kernel runs in the interpreter: "
                    "its timing says nothing about the kernel (tests/test_pg_loss.py checks it)")
def test_triton_small(benchmark):
    inputs = make_inputs(**CPU_SHAPE, dtype=torch.float32, device="cuda")
    benchmark(step, lambda *a: fused_linear_pg_loss(*a, backend="triton").loss, inputs, True)


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


def _loss_fn(impl, inputs):
    if impl == "tspo_triton":
        return lambda *a: fused_linear_pg_loss(*a, backend="triton").loss
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


@needs_cuda
@pytest.mark.benchmark(group="k3-cuda-fwd-bwd")
@pytest.mark.parametrize("N", GPU_TOKENS)
@pytest.mark.parametrize("impl", ["tspo_triton", "eager", "compiled_eager",
                                  "liger_fused_linear_grpo", "liger_triton_grpo_loss", "matmul_floor"])
def test_cuda_pg_loss_fwd_bwd(benchmark, impl, N):
    torch.cuda.empty_cache()
    inputs = make_inputs(N, GPU_H, GPU_V, torch.bfloat16, "cuda")
    fn = _loss_fn(impl, inputs)
    try:
        step(fn, inputs, True)                                   # warm-up / compile
        peak = peak_extra_gib(lambda: step(fn, inputs, True))
    except torch.cuda.OutOfMemoryError as exc:
        pytest.skip(f"{impl} runs out of memory at N={N}: {str(exc).splitlines()[0]}")
    benchmark.extra_info.update(N=N, H=GPU_H, V=GPU_V, dtype="bfloat16", impl=impl,
                                peak_extra_GiB=round(peak, 3),
                                device=torch.cuda.get_device_name())
    benchmark.pedantic(step, args=(fn, inputs, True), rounds=5, warmup_rounds=1)


@needs_cuda
@pytest.mark.benchmark(group="k3-cuda-logprobs")
@pytest.mark.parametrize("N", GPU_TOKENS)
def test_cuda_logprobs(benchmark, N):
    hidden, weight, targets, *_ = make_inputs(N, GPU_H, GPU_V, torch.bfloat16, "cuda")

    def run():
        fused_linear_logprobs(hidden, weight, targets, backend="triton")
        torch.cuda.synchronize()

    run()
    benchmark.extra_info.update(N=N, H=GPU_H, V=GPU_V, dtype="bfloat16",
                                peak_extra_GiB=round(peak_extra_gib(run), 3))
    benchmark.pedantic(run, rounds=5, warmup_rounds=1)
