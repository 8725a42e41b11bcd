"""PASS / MISS per target, from what the steps measured (medians; ratios within one run).

The kernel targets (bench/RESULTS.md, the issue's list):

* K3 dense forward + backward <= 1.10x the three-product floor measured in the same run, faster than
  torch.compile of the eager loss and than Liger's ``triton_grpo_loss``, at a peak of at most 4 GiB
  that is flat in N (the largest N's peak at most 1.10x the smallest's);
* K3 filtered <= 0.75x the floor on LM-like inputs;
* K3 forward-only log-probs <= 1.05x one product;
* K1 <= 30 us at B = 1024, L = 4096;
* K2 <= 1.5x its copy floor.

The trainer part: the ZeRO-3 update runs both layouts, packed micro-batches make the log-prob and
update phases >= 1.6x faster than padded ones with a pi_old pass (bench/RESULTS.md's packing
target), and the trainer runs 3 steps with finite losses and evaluates.

A target nothing in the run measured is ``----`` (not measured), never PASS.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Tuple

from .parse import TestCounts

K3_DENSE_VS_FLOOR = 1.10
K3_DENSE_PEAK_GIB = 4.0
K3_PEAK_FLAT = 1.10
K3_FILTERED_VS_FLOOR = 0.75
K3_LOGPROBS_VS_ONE_PRODUCT = 1.05
K1_SECONDS = 30e-6
K2_VS_COPY_FLOOR = 1.5
PACKED_SPEEDUP = 1.6
TRAIN_STEPS = 3


@dataclass
class Verdict:
    """One line: ``ok`` True (PASS), False (MISS) or None (not measured); ``target`` False for a
    figure shown beside the targets (``also``)."""

    name: str
    ok: Optional[bool]
    detail: str
    target: bool = True

    @property
    def label(self) -> str:
        return "----" if self.ok is None else ("PASS" if self.ok else "MISS")

    def line(self) -> str:
        return f"{'' if self.target else '   also: '}[{self.label}] {self.name}: {self.detail}"


def all_of(oks: Iterable[Optional[bool]]) -> Optional[bool]:
    """True when every one is True, False when any is False, None when none was measured."""
    oks = list(oks)
    if any(ok is False for ok in oks):
        return False
    if not oks or any(ok is None for ok in oks):
        return None
    return True


def fmt_s(s: Optional[float]) -> str:
    if s is None:
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.1f} us"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


def fmt_x(r: Optional[float]) -> str:
    return "-" if r is None else f"{r:.2f}x"


# ---------------------------------------------------------------------------- benchmark lookups
def impl_of(b: dict) -> str:
    return b.get("extra_info", {}).get("impl") or (b.get("params") or {}).get("impl", "")


def kind_of(b: dict) -> Optional[str]:
    g = b.get("group") or ""
    if g.startswith("k3-cuda-fwd-bwd"):
        return "fwd"
    if g.startswith("k3-cuda-logprobs"):
        return "logprobs"
    return None


class K3Index:
    """The K3 CUDA benchmarks by (kind, N, impl, inputs)."""

    def __init__(self, benches: List[dict]):
        self.by: Dict[Tuple[str, int, str, str], dict] = {}
        for b in benches:
            kind, ex = kind_of(b), b.get("extra_info", {})
            if kind and ex.get("N"):
                self.by[(kind, int(ex["N"]), impl_of(b), ex.get("inputs", "uniform"))] = b
        self.Ns = sorted({k[1] for k in self.by})

    def get(self, kind: str, N: int, impl: str, inputs: str = "uniform") -> Optional[dict]:
        return self.by.get((kind, N, impl, inputs))

    def median(self, kind: str, N: int, impl: str, inputs: str = "uniform") -> Optional[float]:
        b = self.get(kind, N, impl, inputs)
        return None if b is None else float(b["stats"]["median"])

    def peak(self, N: int, impl: str, inputs: str = "uniform") -> Optional[float]:
        b = self.get("fwd", N, impl, inputs)
        v = None if b is None else b.get("extra_info", {}).get("peak_extra_GiB")
        return None if v is None else float(v)


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b else None


def _per_n(idx: K3Index, fn: Callable[[int], Tuple[Optional[str], Optional[bool]]]) -> Tuple[str, Optional[bool]]:
    parts, oks = [], []
    for N in idx.Ns:
        txt, ok = fn(N)
        if txt is not None:
            parts.append(f"N={N}: {txt}")
            oks.append(ok)
    return ("; ".join(parts) or "-"), (all_of(oks) if oks else None)


def _vs(idx: K3Index, kind: str, impl: str, inputs: str, ref: str, ref_inputs: str, limit: float,
        strict: bool = False, skipped: bool = False):
    """Per N: median(impl) / median(ref) against ``limit`` (``strict``: below it)."""
    def f(N):
        a, b = idx.median(kind, N, impl, inputs), idx.median(kind, N, ref, ref_inputs)
        r = ratio(a, b)
        if r is None:
            return None, None
        sk = idx.get(kind, N, impl, inputs).get("extra_info", {}).get("skipped_fraction") if skipped else None
        txt = f"{fmt_x(r)} ({fmt_s(a)} vs {fmt_s(b)})" + ("" if sk is None else f", skipped {sk:.3f}")
        return txt, (r < limit if strict else r <= limit)
    return _per_n(idx, f)


def k3_verdicts(benches: List[dict]) -> List[Verdict]:
    idx = K3Index(benches)
    out = []
    floor = _vs(idx, "fwd", "tspo_dense", "uniform", "matmul_floor", "uniform", K3_DENSE_VS_FLOOR)
    compiled = _vs(idx, "fwd", "tspo_dense", "uniform", "compiled_eager", "uniform", 1.0, strict=True)
    liger = _vs(idx, "fwd", "tspo_dense", "uniform", "liger_triton_grpo_loss", "uniform", 1.0, strict=True)

    peaks = {N: idx.peak(N, "tspo_dense") for N in idx.Ns}
    peaks = {N: p for N, p in peaks.items() if p is not None}
    if peaks:
        under = all(p <= K3_DENSE_PEAK_GIB for p in peaks.values())
        lo, hi = peaks[min(peaks)], peaks[max(peaks)]
        flat = (hi <= K3_PEAK_FLAT * lo) if len(peaks) > 1 else None
        mem_ok = False if not under else flat
        mem_txt = ", ".join(f"N={N}: {p:.2f} GiB" for N, p in sorted(peaks.items())) + (
            f"; largest N / smallest N {hi / lo:.2f}x" if len(peaks) > 1 and lo > 0 else "; one N only: flatness "
                                                                                        "not measured")
    else:
        mem_ok, mem_txt = None, "-"
    out += [
        Verdict(f"K3 dense fwd+bwd <= {K3_DENSE_VS_FLOOR:.2f}x the three-product floor of this run (uniform)",
                floor[1], floor[0]),
        Verdict("K3 dense faster than torch.compile of the eager loss", compiled[1], compiled[0]),
        Verdict("K3 dense faster than Liger's triton_grpo_loss", liger[1], liger[0]),
        Verdict(f"K3 dense peak <= {K3_DENSE_PEAK_GIB:.0f} GiB, flat in N (<= {K3_PEAK_FLAT:.2f}x)", mem_ok, mem_txt),
    ]
    out.append(Verdict("K3 dense target (the four lines above)", all_of(v.ok for v in out[-4:]),
                       "all measured and met" if all_of(v.ok for v in out[-4:]) else "see above"))
    filt = _vs(idx, "fwd", "tspo_filtered", "lm_like", "matmul_floor", "lm_like", K3_FILTERED_VS_FLOOR, skipped=True)
    out.append(Verdict(f"K3 filtered <= {K3_FILTERED_VS_FLOOR:.2f}x the floor on LM-like inputs (threshold 2^-12)",
                       filt[1], filt[0]))
    lp = _vs(idx, "logprobs", "tspo_logprobs", "uniform", "one_product", "uniform", K3_LOGPROBS_VS_ONE_PRODUCT)
    out.append(Verdict(f"K3 log-probs <= {K3_LOGPROBS_VS_ONE_PRODUCT:.2f}x one product", lp[1], lp[0]))
    # beside the targets: the other variants against the floor or the dense path
    for name, args in (
            ("K3 dense, Triton-epilogue accumulation, vs the floor",
             ("tspo_dense_triton_acc", "uniform", "matmul_floor", "uniform", K3_DENSE_VS_FLOOR)),
            ("K3 dense on LM-like inputs vs the floor", ("tspo_dense", "lm_like", "matmul_floor", "lm_like",
                                                         K3_DENSE_VS_FLOOR)),
            ("K3 filtered at 2^-8 vs the floor (LM-like)", ("tspo_filtered_t8", "lm_like", "matmul_floor", "lm_like",
                                                            K3_FILTERED_VS_FLOOR)),
            ("K3 filtered not slower than dense on uniform inputs", ("tspo_filtered", "uniform", "tspo_dense",
                                                                     "uniform", 1.0)),
            ("K3 filtered at threshold 0, dense fallback, vs dense", ("tspo_filtered_noskip", "uniform", "tspo_dense",
                                                                      "uniform", 1.0)),
            ("K3 filtered at threshold 0, sparse kernels, vs dense (the model predicts 1.26-1.33x)",
             ("tspo_filtered_noskip_sparse", "uniform", "tspo_dense", "uniform", 1.35))):
        txt, ok = _vs(idx, "fwd", *args, skipped=args[0].startswith("tspo_filtered"))
        out.append(Verdict(name, ok, txt, target=False))
    return out


def k1_k2_verdicts(benches: List[dict], kgraph: Dict[str, Dict[str, str]]) -> List[Verdict]:
    """K1 and K2 from CUDA benchmarks only (on a CPU the Triton kernels run in the interpreter)."""
    by = {b["name"]: float(b["stats"]["median"]) for b in benches
          if b.get("name", "").startswith(("test_k1", "test_k2")) and b.get("extra_info", {}).get("device") != "cpu"}

    def kg(name, mode):
        try:
            return float(kgraph[name][mode]) * 1e-6
        except (KeyError, ValueError):
            return None

    out = []
    k1w, k1g, k1e = by.get("test_k1_triton"), kg("k1", "graph_us"), kg("k1", "events_us")
    k1 = k1w if k1w is not None else k1g
    out.append(Verdict(f"K1 <= {K1_SECONDS * 1e6:.0f} us at B=1024, L=4096 (wall-clock median when measured)",
                       None if k1 is None else k1 <= K1_SECONDS,
                       f"wall-clock (call + sync) {fmt_s(k1w)}; device: CUDA-graph replay {fmt_s(k1g)}, "
                       f"events {fmt_s(k1e)}"))
    k2w, k2f = by.get("test_k2_triton"), by.get("test_k2_memory_floor")
    k2g, k2fg = kg("k2", "graph_us"), kg("k2_copy_floor", "graph_us")
    rw, rg = ratio(k2w, k2f), ratio(k2g, k2fg)
    r = rw if rw is not None else rg
    out.append(Verdict(f"K2 <= {K2_VS_COPY_FLOOR:.1f}x its copy floor (wall-clock medians when measured)",
                       None if r is None else r <= K2_VS_COPY_FLOOR,
                       f"wall-clock {fmt_x(rw)} ({fmt_s(k2w)} vs {fmt_s(k2f)}); CUDA-graph replay {fmt_x(rg)} "
                       f"({fmt_s(k2g)} vs {fmt_s(k2fg)})"))
    return out


def correctness_verdicts(tests: Optional[TestCounts], check: List[str], collected: Optional[int] = None
                         ) -> List[Verdict]:
    """The tests (``collected``: how many pytest collected; fewer run is a MISS: the step was cut)
    and the K3 check's lines."""
    out = []
    if tests is not None:
        if tests.problem:
            out.append(Verdict("kernel tests all pass", None, tests.problem))
        else:
            cut = collected is not None and tests.tests < collected
            out.append(Verdict("kernel tests all pass",
                               tests.tests > 0 and not tests.failures and not tests.errors and not cut,
                               f"{tests.tests} run, {tests.passed} passed, {tests.failures} failed, {tests.errors} "
                               f"errors, {tests.skipped} skipped"
                               + (f"; only {tests.tests} of the {collected} collected ran (cut at its time limit)"
                                  if cut else "")))
    total = [line for line in check if line.startswith("k3check")]
    if total:
        fails = [line for line in check if line.startswith("FAIL")]
        out.append(Verdict("K3 check on device tensors all pass", not fails and "0 failed" in total[-1], total[-1]))
    elif check:
        out.append(Verdict("K3 check on device tensors all pass", False, "no total line: the check did not finish"))
    return out


def trainer_verdicts(update: Optional[dict], metrics: Optional[List[dict]]) -> List[Verdict]:
    out = []
    if update is None:
        out.append(Verdict("ZeRO-3 update runs padded and packed micro-batches", None, "no result (step skipped?)"))
        out.append(Verdict(f"packed >= {PACKED_SPEEDUP:.1f}x padded+old on log-probs + update", None, "-"))
    else:
        modes = update.get("modes", {})
        a, b = modes.get("padded+old"), modes.get("packed")
        out.append(Verdict("ZeRO-3 update runs padded and packed micro-batches", bool(a and b),
                           f"{update.get('device')}, {update.get('rows')} rows, {update.get('tokens')} tokens; "
                           f"layouts: {', '.join(modes) or 'none'}"))
        if a and b:
            sp = (a["logprobs_s"] + a["update_s"]) / (b["logprobs_s"] + b["update_s"])
            out.append(Verdict(f"packed >= {PACKED_SPEEDUP:.1f}x padded+old on log-probs + update", sp >= PACKED_SPEEDUP,
                               f"{sp:.2f}x ({fmt_s(a['logprobs_s'] + a['update_s'])} vs "
                               f"{fmt_s(b['logprobs_s'] + b['update_s'])})"))
        else:
            out.append(Verdict(f"packed >= {PACKED_SPEEDUP:.1f}x padded+old on log-probs + update", None, "-"))
    if metrics is None:
        out.append(Verdict(f"trainer runs {TRAIN_STEPS} steps with finite losses", None, "no metrics (step skipped?)"))
        out.append(Verdict("trainer evaluates", None, "-"))
        return out
    steps = [r for r in metrics if "time/step" in r]
    finite = all(math.isfinite(float(r.get("loss/pg", float("nan")))) for r in steps)
    out.append(Verdict(f"trainer runs {TRAIN_STEPS} steps with finite losses", len(steps) >= TRAIN_STEPS and finite,
                       f"{len(steps)} steps, losses {[round(float(r.get('loss/pg', float('nan'))), 4) for r in steps]}"))
    evals = [r for r in metrics if "eval/em" in r]
    out.append(Verdict("trainer evaluates", bool(evals),
                       ", ".join(f"step {r.get('step')}: EM {r['eval/em']}" for r in evals) or "no evaluation record"))
    return out
