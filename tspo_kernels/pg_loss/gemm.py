"""K3's weight-gradient accumulation: ``acc (float32) (+)= a @ b`` for 16-bit ``a`` and ``b``,
accumulated inside the product so that no (V, H) product is stored on its own.

Three strategies (:func:`add_product_`): ``"dtype_out"``, cuBLAS through
``aten::addmm.dtype_out`` (torch >= 2.8 on CUDA; :func:`dtype_out_ok` checks the build once per
device and dtype); ``"triton"``, ``_mm_acc_kernel``, a Triton GEMM whose epilogue adds into the
float32 accumulator (where the build lacks ``dtype_out``); ``"upcast"``, float32 copies of the
operands (CPU).  The package picks one per call (``tspo_kernels.pg_loss._acc_strategy``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._checks import INTERPRET

__all__ = ["STRATEGIES", "add_product_", "auto_strategy", "dtype_out_ok", "mm_acc_launch", "mm_acc_triton"]

STRATEGIES = ("dtype_out", "triton", "upcast")


@triton.jit
def _mm_acc_kernel(a_ptr, b_ptr, c_ptr, M, N, K, s_am, s_ak, s_bk, s_bn, s_cm, s_cn,
                   ACCUMULATE: tl.constexpr, DOT_F32: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                   BK: tl.constexpr, GROUP_M: tl.constexpr):
    """C (float32) = A @ B (+ C with ACCUMULATE): the epilogue adds into the accumulator, so the
    product is never stored on its own.  Grouped tile order for L2 reuse.

    Every address offset is formed in 64 bits: with A = logits^T the stride s_ak is V, so the
    offset k * s_ak passes 2^31 from K = 14,123 token rows on at V = 152,064 (an explicit
    ``chunk_size`` or a larger ``memory_budget`` reaches that); the k-loop advances the pointers
    by a 64-bit step."""
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
    rk = tl.arange(0, BK).to(tl.int64)
    a_ptrs = a_ptr + rm[:, None] * s_am + rk[None, :] * s_ak
    b_ptrs = b_ptr + rk[:, None] * s_bk + rn[None, :] * s_bn
    a_step = tl.full((), BK, tl.int64) * s_ak
    b_step = tl.full((), BK, tl.int64) * s_bk
    acc = tl.zeros((BM, BN), tl.float32)
    for k0 in range(0, K, BK):
        kin = rk < K - k0
        a = tl.load(a_ptrs, mask=(rm < M)[:, None] & kin[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=kin[:, None] & (rn < N)[None, :], other=0.0)
        if DOT_F32:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        a_ptrs += a_step
        b_ptrs += b_step
    ptr = c_ptr + rm[:, None] * s_cm + rn[None, :] * s_cn
    msk = (rm < M)[:, None] & (rn < N)[None, :]
    if ACCUMULATE:
        acc += tl.load(ptr, mask=msk, other=0.0)
    tl.store(ptr, acc, mask=msk)


def mm_acc_launch(*, interpret: bool = INTERPRET) -> dict:
    """The tile configuration of ``_mm_acc_kernel`` (the compile check builds the compiled one)."""
    if interpret:
        return dict(BM=32, BN=32, BK=32, GROUP_M=8, num_warps=4, num_stages=1)
    return dict(BM=128, BN=128, BK=64, GROUP_M=8, num_warps=8, num_stages=3)


def mm_acc_triton(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, accumulate: bool) -> None:
    """acc (float32, (M, N)) = a @ b, or += with ``accumulate``, through ``_mm_acc_kernel``."""
    M, K = a.shape
    N = b.shape[1]
    f32 = INTERPRET or a.dtype == torch.float32          # the interpreter multiplies bf16 wrongly
    cfg = mm_acc_launch()
    grid = (triton.cdiv(M, cfg["BM"]) * triton.cdiv(N, cfg["BN"]),)
    _mm_acc_kernel[grid](a, b, acc, M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
                         acc.stride(0), acc.stride(1), ACCUMULATE=accumulate, DOT_F32=f32, **cfg)


_DTYPE_OUT_OK: dict = {}


def dtype_out_ok(device: torch.device, dtype: torch.dtype) -> bool:
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


def auto_strategy(device: torch.device, dtype: torch.dtype) -> str:
    """The accumulation strategy for 16-bit operands on ``device``: cuBLAS where it can,
    the Triton GEMM on CUDA otherwise, float32 copies on CPU."""
    if device.type == "cuda":
        return "dtype_out" if dtype_out_ok(device, dtype) else "triton"
    return "upcast"


def add_product_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, first: bool, strategy: str) -> None:
    """acc (float32) = a @ b (``first``) or += a @ b, for 16-bit a and b, accumulated inside the product."""
    if strategy == "dtype_out":
        if first:
            torch.ops.aten.mm.dtype_out(a, b, torch.float32, out=acc)
        else:
            torch.ops.aten.addmm.dtype_out(acc, a, b, torch.float32, out=acc)
    elif strategy == "triton":
        mm_acc_triton(acc, a, b, accumulate=not first)
    elif first:
        torch.mm(a.float(), b.float(), out=acc)
    else:
        acc.addmm_(a.float(), b.float())
