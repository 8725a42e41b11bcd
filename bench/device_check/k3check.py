"""K3 against the float64 reference on device tensors (``python -m device_check.k3check``).

tests/test_pg_loss.py's CUDA runs send only the row kernel to the GPU (tests/conftest.py moves its
inputs): the products, the float32 weight-gradient accumulation, the filtered path and the
vocabularies above one 4096-wide block run on the device only here.  Checked, each judged as
tests/test_pg_loss.py judges (its ``error_of`` and tolerances; inputs from its ``make_case`` and
bench/lm_like.py):

1. the fused loss at large vocabularies (several BLOCK_V blocks per row, the masked tail), float32,
   bf16 and fp16, several option sets and chunk sizes;
2. the forward-only log-probs (+ entropy);
3. the dense path's float32 weight-gradient accumulation, forced to ``dtype_out`` (cuBLAS
   ``addmm.dtype_out``) and to ``triton`` (the Triton GEMM epilogue) over several chunks, the way
   tests/test_pg_loss.py forces it (``_ACC_OVERRIDE``);
4. the gradient-filtered path: threshold 0 (the dense result) through the block-sparse kernels and
   through the dense fallback, and 2^-12 within its reported error bound, on random and LM-like
   inputs, float32 and bf16;
5. the filtered path's Triton kernels against its PyTorch ops on the same device tensors.

Without CUDA it runs in Triton's interpreter at small shapes (a dry run).  Prints one
``PASS`` / ``FAIL`` / ``NOTE`` line per case and ``k3check (...): P passed, F failed`` last; exits 1
when any case failed.  Only the public API is used, and the tests' own helpers.
"""
from __future__ import annotations

import functools
import inspect
import os
import sys
import time
from typing import Callable, Dict, Optional, Tuple

import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")        # before the kernels are defined
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tests"))
import test_pg_loss as T  # noqa: E402  (the tests' case builder, reference and judging; after TRITON_INTERPRET)
from lm_like import make_lm_like_inputs  # noqa: E402  (bench/, on PYTHONPATH)

from tspo_kernels import fused_linear_logprobs, fused_linear_pg_loss  # noqa: E402  (after TRITON_INTERPRET)
from tspo_kernels import pg_loss as pg_mod  # noqa: E402  (the tests' accumulation override lives there)
from tspo_kernels.reference import logprobs_reference  # noqa: E402  (after TRITON_INTERPRET)

DEV = torch.device("cuda" if CUDA else "cpu")
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
#: (option set, dtype, N, H, V, chunk_size): vocabularies above one BLOCK_V (4096 on CUDA)
CASES = [("plain", F32, 64, 64, 5000, 16), ("all", F32, 48, 32, 152064, 16), ("all", BF16, 64, 64, 40000, None),
         ("kl_clamped", F16, 64, 64, 9000, 32), ("all", F32, 1000, 128, 8192, None),
         ("asym_clip", BF16, 96, 64, 152064, 48)]
if not CUDA:   # the interpreter: small shapes (its BLOCK_V is 128, so V = 300 spans 3 blocks)
    CASES = [("plain", F32, 24, 16, 300, 8), ("all", BF16, 20, 16, 300, None)]


def dname(dtype: torch.dtype) -> str:
    return str(dtype).split(".")[-1]


def on(x):
    return x.to(DEV) if isinstance(x, torch.Tensor) else x


def errors(got: Dict[str, torch.Tensor], want: Dict[str, torch.Tensor], dtype) -> Dict[str, Tuple[float, float]]:
    """output -> (error, tolerance), judged as tests/test_pg_loss.py judges them; a non-finite
    output's error is infinite."""
    return {k: (float("inf"), T.TOL[dtype]) if not torch.isfinite(got[k]).all() else T.error_of(k, got, want, dtype)
            for k in T.outputs_of(want)}


def judge(name: str, errs: Dict[str, Tuple[float, float]], extra_ok: bool = True, note: str = "") -> Tuple[bool, str]:
    """(passed, the PASS / FAIL line) of a case: every output within its tolerance and ``extra_ok``."""
    worst = max(errs, key=lambda k: errs[k][0] / errs[k][1])
    ok = all(e <= tol for e, tol in errs.values()) and bool(extra_ok)
    line = (f"{'PASS' if ok else 'FAIL'} {name}: worst {worst} rel err {errs[worst][0]:.2e} "
            f"(tol {errs[worst][1]:.1e}){note}")
    if not ok:
        line += "\n    all: " + str({k: f"{e:.2e} (tol {tol:.1e})" for k, (e, tol) in errs.items()})
    return ok, line


class Tally:
    """Counts cases and prints their lines."""

    def __init__(self, out=sys.stdout):
        self.passed = self.failed = 0
        self.out = out

    def record(self, ok: bool, line: str) -> None:
        self.passed, self.failed = self.passed + bool(ok), self.failed + (not ok)
        print(line, file=self.out, flush=True)

    def guarded(self, name: str, fn: Callable[[], None]) -> None:
        """Run one case; an exception is a failed case, not the end of the check."""
        t = time.time()
        try:
            fn()
        except Exception as exc:      # any error of a case is its failure, reported; the next case runs
            self.record(False, f"FAIL {name}: {type(exc).__name__}: {str(exc)[:500]}")
        print(f"    [{name}: {time.time() - t:.1f} s]", file=self.out, flush=True)


def filtered_call(stats: dict) -> Callable:
    """``fused_linear_pg_loss`` that leaves the filter's statistics in ``stats``: through its
    ``filter_stats`` argument where it takes one, else from the output's ``filter_stats``."""
    takes_arg = "filter_stats" in inspect.signature(fused_linear_pg_loss).parameters

    def fn(*args, **kw):
        if takes_arg:
            return fused_linear_pg_loss(*args, filter_stats=stats, **kw)
        out = fused_linear_pg_loss(*args, **kw)
        stats.update(getattr(out, "filter_stats", None) or {})
        return out
    return fn


def device_run(fn, args, kw, **extra) -> Dict[str, torch.Tensor]:
    """tests/test_pg_loss.py's ``run`` on device copies of the inputs; results back on the CPU."""
    got = T.run(fn, tuple(on(a) for a in args), {k: on(v) for k, v in kw.items()}, **extra)
    return {k: v.cpu() for k, v in got.items()}


# ---------------------------------------------------------------------------- (1) the fused loss
def loss_case(tally: Tally, i: int, opts: str, dtype, N: int, H: int, V: int, chunk: Optional[int]) -> None:
    name = f"pg_loss {opts} {dname(dtype)} N={N} H={H} V={V} chunk={chunk}"
    t = time.time()
    args, kw = T.make_case(500 + i, N, H, V, dtype, opts=T.OPTION_SETS[opts])
    got = device_run(fused_linear_pg_loss, args, kw, chunk_size=chunk, backend="triton")
    tally.record(*judge(name, errors(got, T.reference_of(args, kw), dtype), note=f" [{time.time() - t:.1f} s]"))


# ---------------------------------------------------------------------------- (2) log-probs
def logprobs_case(tally: Tally, dtype, V: int) -> None:
    name = f"logprobs {dname(dtype)} N=64 H=64 V={V}"
    args, kw = T.make_case(900 + V % 97, 64, 64, V, dtype, opts={"bias": True, "temperature": 0.7})
    h, w, y = args[:3]
    lp, ent = fused_linear_logprobs(on(h), on(w), on(y), bias=on(kw["bias"]), temperature=0.7, return_entropy=True,
                                    backend="triton")
    want_lp, want_ent = logprobs_reference(h.double(), w.double(), y, bias=kw["bias"].double(), temperature=0.7,
                                           return_entropy=True)
    e1, e2 = T.rel(lp.cpu(), want_lp), T.rel(ent.cpu(), want_ent)
    ok = max(e1, e2) <= T.TOL[dtype] and bool(torch.isfinite(lp).all()) and bool(torch.isfinite(ent).all())
    tally.record(ok, f"{'PASS' if ok else 'FAIL'} {name}: logp rel err {e1:.2e}, entropy {e2:.2e} "
                     f"(tol {T.TOL[dtype]:.1e})")


# ---------------------------------------------------------------------------- (3) the accumulation
def accumulation_case(tally: Tally, strategy: str) -> None:
    N, H, V, chunk = (256, 64, 40000, 64) if CUDA else (40, 16, 300, 16)
    name = f"pg_loss dense acc={strategy} bfloat16 N={N} H={H} V={V} chunk={chunk}"
    if strategy == "dtype_out" and not (CUDA and pg_mod._dtype_out_ok(DEV, BF16)):
        print(f"NOTE {name}: aten::addmm.dtype_out unavailable here ({'no CUDA' if not CUDA else 'this torch'}); "
              "the dense path uses the Triton epilogue", flush=True)
        return
    args, kw = T.make_case(701, N, H, V, BF16, opts=T.OPTION_SETS["all"])
    before = pg_mod._ACC_OVERRIDE
    pg_mod._ACC_OVERRIDE = strategy                       # as tests/test_pg_loss.py forces it
    try:
        got = device_run(fused_linear_pg_loss, args, kw, chunk_size=chunk, backend="triton")
    finally:
        pg_mod._ACC_OVERRIDE = before
    tally.record(*judge(name, errors(got, T.reference_of(args, kw), BF16), note=f" [strategy {strategy}]"))


# ---------------------------------------------------------------------------- (4) the filtered path
_REFS: Dict[tuple, dict] = {}


def filtered_inputs(kind: str, dtype):
    if kind == "random":
        N, H, V, chunk = (256, 64, 40000, 128) if CUDA else (40, 16, 300, 16)
        args, kw = T.make_case(811, N, H, V, dtype, opts=T.OPTION_SETS["all"])
    else:
        N, H, V, chunk = (512, 512, 32768, None) if CUDA else (64, 16, 512, 32)
        h, w, y, old, adv, mask = make_lm_like_inputs(N, H, V, dtype, "cpu", seed=5)
        args, kw = (h.detach(), w.detach(), y, old, adv, mask), {}
    return (N, H, V, chunk), args, kw


def bound_check(args, stats: dict, got: dict, dense: dict) -> Tuple[bool, str]:
    """sum |filtered - dense| <= the dropped-mass bound x the largest row 1-norm of the other
    factor (+ float32 rounding of two products), for both gradients."""
    ok, note = True, ""
    w64, h64, m = args[1].double(), args[0].double(), args[5] != 0
    for g, bound in (("grad_hidden", float(stats["dropped_l1_bound_dh"]) * float(w64.abs().sum(1).max())),
                     ("grad_weight", float(stats["dropped_l1_bound_dw"]) * float(h64[m].abs().sum(1).max()))):
        err = float((got[g].double() - dense[g].double()).abs().sum())
        slack = 1e-4 * float(dense[g].double().abs().sum())
        ok = ok and err <= bound + slack
        note += f" [{g}: |filtered - dense|_1 {err:.2e} <= bound {bound:.2e} + {slack:.1e}]"
    return ok, note


def filtered_case(tally: Tally, kind: str, dtype, thr: float, dense_above: float = 0.75) -> None:
    (N, H, V, chunk), args, kw = filtered_inputs(kind, dtype)
    name = (f"pg_loss filtered {kind} {dname(dtype)} threshold={thr:g} dense_above={dense_above:g} N={N} H={H} "
            f"V={V} chunk={chunk}")
    stats: dict = {}
    got = device_run(filtered_call(stats), args, kw, chunk_size=chunk, backend="triton", backward="filtered",
                     filter_threshold=thr, filter_dense_above=dense_above)
    dense = device_run(fused_linear_pg_loss, args, kw, chunk_size=chunk, backend="triton")
    if (kind, dtype) not in _REFS:                          # the float64 reference, once per inputs
        _REFS[(kind, dtype)] = T.reference_of(args, kw)
    ref = _REFS[(kind, dtype)]
    skipped = float(stats["skipped_fraction"])
    ok = skipped == 0.0 if thr == 0.0 else (skipped > 0.0 or kind == "random" or not CUDA)
    note = (f" [skipped {skipped:.3f}: dh {float(stats['skipped_dh']):.3f}, dw {float(stats['skipped_dw']):.3f};"
            f" dense chunks {stats['dense_chunks']}/{stats['chunks']}]")
    if thr == 0.0:                                  # every chunk keeps all: dense products unless told never
        ok = ok and stats["dense_chunks"] == (stats["chunks"] if dense_above < 1.0 else 0)
    if dtype == F32:
        b_ok, b_note = bound_check(args, stats, got, dense)
        ok, note = ok and b_ok, note + b_note
    want = ref
    if kind == "lm_like" and dtype != F32:
        # LM-like logits reach |z| ~ 20-50: bf16 logits alone put the dense path near the bf16
        # tolerance of the float64 reference, so the filter is judged against the dense bf16 path
        de = errors(dense, ref, dtype)
        note += f" [vs the dense bf16 path; dense vs float64: worst {max(e for e, _ in de.values()):.2e}]"
        want = dict({k: v.double() for k, v in dense.items()}, loss_scale=ref["loss_scale"])
    tally.record(*judge(name, errors(got, want, dtype), ok, note))


# ---------------------------------------------------------------------------- (5) Triton vs PyTorch ops
def filtered_backends(tally: Tally) -> None:
    N, H, V = (512, 128, 32768) if CUDA else (64, 16, 512)
    h, w, y, old, adv, mask = make_lm_like_inputs(N, H, V, F32, "cpu", seed=6)
    args = (h.detach(), w.detach(), y, old, adv, mask)
    runs = {b: device_run(fused_linear_pg_loss, args, {}, backend=b, backward="filtered") for b in ("torch", "triton")}
    errs = {k: (T.rel(runs["triton"][k], runs["torch"][k]), 1e-4) for k in ("grad_hidden", "grad_weight", "logp", "loss")}
    tally.record(*judge(f"pg_loss filtered LM-like float32 N={N} H={H} V={V}: Triton vs PyTorch backend", errs))


def main() -> int:
    tally = Tally()
    run = functools.partial
    for i, (opts, dtype, N, H, V, chunk) in enumerate(CASES):
        tally.guarded(f"pg_loss {opts} {dname(dtype)} V={V}", run(loss_case, tally, i, opts, dtype, N, H, V, chunk))
    for dtype, V in ((F32, 152064), (BF16, 40000)):
        V = V if CUDA else 300
        tally.guarded(f"logprobs {dname(dtype)} V={V}", run(logprobs_case, tally, dtype, V))
    for strategy in ("dtype_out", "triton"):
        tally.guarded(f"dense acc={strategy}", run(accumulation_case, tally, strategy))
    for kind in ("random", "lm_like"):
        for dtype in (F32, BF16):
            for thr, da in ((0.0, 1.0), (2.0 ** -12, 0.75)):   # the sparse kernels over every tile; the default
                tally.guarded(f"filtered {kind} {dname(dtype)} {thr:g} {da:g}",
                              run(filtered_case, tally, kind, dtype, thr, da))
    for dtype in (F32, BF16):    # threshold 0 with the default dense_above: every chunk falls back to dense
        tally.guarded(f"filtered random {dname(dtype)} 0 fallback", run(filtered_case, tally, "random", dtype, 0.0))
    tally.guarded("filtered backends", run(filtered_backends, tally))
    print(f"k3check ({'CUDA, compiled' if CUDA else 'CPU, interpreter'}): {tally.passed} passed, {tally.failed} failed",
          flush=True)
    return 1 if tally.failed else 0


if __name__ == "__main__":
    sys.exit(main())
