"""The test harness gives every Triton kernel launch tensors on the kernels' device.

On a CUDA machine ``tests/conftest.py`` routes every launch through
``tests/_device_harness.LaunchRouter`` (CPU-built inputs -> GPU copies -> results back).  Whether
that reaches every kernel path can be checked without a GPU: here the router copies into fresh
CPU storage instead (``clone=True``; on a CUDA machine it copies to the GPU as there), and each
path the kernel tests take (K1; K2; K3 dense, log-probs, filtered block-sparse and filtered
dense-fallback on the Triton backend; the Triton weight-gradient GEMM under the PyTorch backend)
must (1) hand its kernels nothing but routed storage on the router's device, (2) give the very
results it gives unrouted (what the kernels wrote came back), and (3) together launch every
Triton kernel the package defines, so that a kernel added later needs a case here.
"""
import inspect
from importlib import import_module

import pytest
import torch
from _device_harness import LaunchRouter
from test_pg_loss import OPTION_SETS, SMALL_TILES, make_case
from triton.runtime.jit import KernelInterface

import tspo_kernels as tk
from tspo_kernels import pg_loss as pg_mod

# the package exports functions named like two of its modules: take the modules themselves
KERNEL_MODULES = tuple(import_module(f"tspo_kernels.{m}") for m in (
    "first_occurrence", "advantages", "pg_loss", "pg_loss.rows", "pg_loss.filtered", "pg_loss.gemm", "pg_loss.chunks"))
first_occurrence = KERNEL_MODULES[0]


def _kernels_defined():
    names = set()
    for module in KERNEL_MODULES:
        for name, obj in inspect.getmembers(module):
            if isinstance(obj, KernelInterface) and name.endswith("_kernel"):
                names.add(name)
    return names


def _k1():
    gen = torch.Generator().manual_seed(11)
    B, L = 3, 90
    ids = torch.randint(0, 4, (B, L), generator=gen)
    turn = (torch.arange(L) // 9 - 1).int().expand(B, L).contiguous()
    obs = ((torch.arange(L) // 9) % 2 == 1).expand(B, L).contiguous()
    pats = tk.pack_patterns([[ids[b, 40:43].tolist(), [1, 2]] for b in range(B)])
    out = (torch.full((B,), 7, dtype=torch.int64), torch.full((B,), -7, dtype=torch.int64))
    return first_occurrence._first_occurrence_triton(ids, turn, obs, pats, "any", block_l=32, out=out)


def _k2():
    R = torch.tensor([1.0, 0.0, 0.5, 1.0])
    ks = torch.tensor([0, 1, -1, 1])
    K = torch.tensor([2, 3, 1, 2])
    turn = torch.full((4, 24), -1, dtype=torch.int32)
    mask = torch.zeros(4, 24, dtype=torch.bool)
    for b, k_b in enumerate(K.tolist()):
        for k in range(k_b):
            turn[b, 2 + 5 * k: 7 + 5 * k] = k
            mask[b, 2 + 5 * k: 5 + 5 * k] = True
    return tk.turn_advantages(R, ks, K, torch.tensor([5, 5, 6, 6]), turn, mask, backend="triton")


def _k3(dtype=torch.float32, **extra):
    args, kw = make_case(1234, 40, 16, 150, dtype, opts=OPTION_SETS["all"])
    h, w = args[0].clone().requires_grad_(), args[1].clone().requires_grad_()
    kw = dict(kw, bias=kw["bias"].clone().requires_grad_())
    out = tk.fused_linear_pg_loss(h, w, *args[2:], **kw, chunk_size=16, **extra)
    out.loss.backward()
    return tuple(out) + (h.grad, w.grad, kw["bias"].grad)


def _logprobs():
    args, _ = make_case(1235, 40, 16, 150, torch.float32)
    return tk.fused_linear_logprobs(*args[:3], return_entropy=True, chunk_size=16, backend="triton")


CASES = {
    "k1": (_k1, {"_first_occurrence_kernel"}),
    "k2": (_k2, {"_turn_table_kernel", "_token_adv_kernel"}),
    "k3 dense triton": (lambda: _k3(backend="triton"), {"_pg_rows_kernel"}),
    "k3 logprobs triton": (_logprobs, {"_pg_rows_kernel"}),
    "k3 filtered triton, block-sparse": (
        lambda: _k3(backend="triton", backward="filtered", filter_dense_above=1.0, filter_threshold=2.0 ** -6),
        {"_pg_rows_kernel", "_soft_grad_kernel", "_filtered_dh_kernel", "_filtered_dw_kernel"}),
    "k3 filtered triton, dense fallback": (
        lambda: _k3(backend="triton", backward="filtered", filter_threshold=0.0),
        {"_pg_rows_kernel", "_soft_grad_kernel"}),
    "k3 torch, Triton GEMM accumulation": (lambda: _k3(torch.bfloat16, backend="torch"), {"_mm_acc_kernel"}),
}


def _device():
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _same(a, b):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b) or (a.is_floating_point() and torch.allclose(a, b, rtol=0, atol=0, equal_nan=True))
        return
    assert len(a) == len(b)
    for x, y in zip(a, b):
        _same(x, y)


@pytest.fixture
def small_tiles(monkeypatch):
    monkeypatch.setattr(pg_mod, "FILTER_TILES", SMALL_TILES)
    monkeypatch.setattr(pg_mod, "FILTER_BLOCK_H", 16)
    monkeypatch.setattr(pg_mod, "_ACC_OVERRIDE", "triton")      # the bf16 torch case accumulates in Triton


@pytest.mark.parametrize("case", list(CASES))
def test_every_launch_gets_routed_tensors(case, small_tiles):
    fn, kernels = CASES[case]
    plain = fn()
    dev = _device()
    with LaunchRouter(dev, clone=dev.type == "cpu") as router:
        routed = fn()
    assert router.launches, "no Triton launch went through the router"
    assert kernels <= {launch.kernel for launch in router.launches}, router.launches
    for launch in router.launches:
        assert launch.devices == {str(dev) if dev.type == "cpu" else f"cuda:{dev.index or 0}"}, launch
        if dev.type == "cpu":
            assert launch.routed == launch.tensors, launch      # no argument reached a kernel unrouted
    _same(routed, plain)                                        # what the kernels wrote came back


def test_cases_cover_every_kernel():
    """Every Triton kernel the package defines is launched by some case above."""
    covered = set().union(*(k for _, k in CASES.values()))
    assert _kernels_defined() <= covered, sorted(_kernels_defined() - covered)
