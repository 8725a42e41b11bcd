"""The device check's two parts, their steps, and each step's time limit.

The check is two runs, each well inside a 10-minute command on a lent GPU: ``kernels`` (at most
540 s: the correctness tests, the K3 check, the device-side K1/K2 times, the K1/K2/K3 benchmarks,
Liger and torch.compile) and ``trainer`` (at most 300 s: one ZeRO-3 update and 3 steps of the
trainer).  Each step has a cap; the caps of a
part plus what the shell spends before the runner starts (:data:`SETUP_S`: the machine's facts
and the offline installs) and after it (:data:`WRAPUP_S`: the summary and the archive) fit its
budget, so every step gets its cap unless the setup overran; then the last steps are cut first
(:func:`step_limit`).  A step at its limit is interrupted (SIGINT: pytest still writes the results
of what finished).

Each cap is sized from the step's estimate (:attr:`Step.estimate_s`), at least
:data:`CAP_OVER_ESTIMATE` times it.  The estimates come from what was measured: the per-call times
of the H200 run of 2026-11-26 (bench/RESULTS.md: K3 dense 154 / 236 ms, the matmul floor 77 / 159 ms,
eager 103 / 209 ms, Liger's fused-linear loss 1.06 / 2.10 s, its triton_grpo_loss 77 / 158 ms,
torch.compile 85 / 173 ms, log-probs 30 / 59 ms, at N = 16384 / 32768) times the calls each
benchmark makes (:func:`k3_calls`), plus start-up and compile costs that were not measured there
(stated as assumptions in :attr:`Step.basis`).  ``summary.txt`` prints every step's measured time
beside its cap and estimate: the first run on a card gives the figures to re-size from.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

#: seconds a part may take, start to end, on the device (the shell's work included)
PART_BUDGET_S: Dict[str, int] = {"kernels": 540, "trainer": 300}
#: the shell's work before the runner starts: env.txt (nvidia-smi, the Python facts) and the offline
#: installs of the carried wheels (pip show + pip install per missing package, about 1-2 s each)
SETUP_S: Dict[str, int] = {"kernels": 25, "trainer": 25}
#: after the last step: summary.txt and raw.tar.gz
WRAPUP_S = 5
#: a step given less than this is skipped (it would only start and be interrupted)
MIN_STEP_S = 10
#: a step at its limit gets SIGINT, then this long to write its results before it is killed
KILL_GRACE_S = 10
#: every cap is at least this multiple of its estimate
CAP_OVER_ESTIMATE = 1.25

#: per-call seconds on the H200 of 2026-11-26 (bench/RESULTS.md), at N = (16384, 32768) tokens
MEASURED_CALL_S: Dict[str, Tuple[float, float]] = {
    "matmul_floor": (0.0774, 0.1592),
    "tspo_dense": (0.1543, 0.2356),
    "eager": (0.1030, 0.2088),
    "compiled_eager": (0.0851, 0.1729),
    "liger_fused_linear_grpo": (1.057, 2.101),
    "liger_triton_grpo_loss": (0.0768, 0.1579),
    "tspo_logprobs": (0.0301, 0.0589),
    "one_product": (0.0301, 0.0589),        # not timed then; taken as the log-probs' (both one product)
}
#: K3 variants with no measured time yet: the dense path's time times this (bench/RESULTS.md's
#: traffic model predicts the filtered path at 0.85-1.0x the floor and the sparse no-skip route at
#: 1.26-1.33x dense)
UNMEASURED_VS_DENSE: Dict[str, float] = {
    "tspo_dense_triton_acc": 1.0, "tspo_filtered": 1.0, "tspo_filtered_noskip": 1.15,
    "tspo_filtered_noskip_sparse": 1.35, "tspo_filtered_t8": 1.0,
}
#: bench/test_bench_pg_loss.py: calls per fwd+bwd case (warm-up, peak memory, timed rounds) and per
#: log-probs case (first run, peak, 1 warm-up round, 5 rounds)
FWD_BWD_CALLS, SLOW_CALLS, LOGPROB_CALLS = 7, 5, 8
SLOW = ("eager", "compiled_eager", "liger_fused_linear_grpo", "liger_triton_grpo_loss")


def call_s(impl: str, n_index: int) -> float:
    if impl in MEASURED_CALL_S:
        return MEASURED_CALL_S[impl][n_index]
    return MEASURED_CALL_S["tspo_dense"][n_index] * UNMEASURED_VS_DENSE[impl]


def k3_calls(impls: List[str], logprobs: bool = False) -> float:
    """Seconds of the calls bench/test_bench_pg_loss.py makes for ``impls`` at both N (no start-up)."""
    total = 0.0
    for n_index in (0, 1):
        for impl in impls:
            calls = LOGPROB_CALLS if logprobs else (SLOW_CALLS if impl in SLOW else FWD_BWD_CALLS)
            total += calls * call_s(impl, n_index)
    return total


#: the fwd+bwd cases the fast K3 step times (bench/test_bench_pg_loss.py's FWD_BWD_CASES without the
#: Liger and torch.compile ones; the floor and the dense path once per kind of input)
K3_FAST = ["matmul_floor", "tspo_dense", "tspo_dense_triton_acc", "tspo_filtered", "tspo_filtered_noskip",
           "tspo_filtered_noskip_sparse", "matmul_floor", "tspo_dense", "tspo_filtered", "tspo_filtered_t8", "eager"]
#: assumptions (not measured on a GPU yet): a pytest process's start (imports, collection), the
#: uniform inputs of both N built from the CPU generator (two 545 M-element W), Triton compiles
PYTEST_START_S, K3_INPUTS_S, K3_COMPILES_S = 10.0, 8.0, 25.0


@dataclass(frozen=True)
class Step:
    """One step of a part: ``name`` (also its ``STEPS`` word), its ``cap_s``, the ``estimate_s`` the
    cap is sized from, and the ``basis`` of the estimate."""

    name: str
    part: str
    cap_s: int
    estimate_s: float
    basis: str


STEPS: List[Step] = [
    Step("tests", "kernels", 110, 75.0,
         "assumption: tests/test_first_occurrence.py, test_advantages.py, test_pg_loss.py on 8 pytest-xdist "
         "workers, dominated by Triton compiles (the H200 run's step was not timed)"),
    Step("k3check", "kernels", 70, 45.0,
         "assumption: 21 K3 cases on device tensors, each with a float64 reference on the CPU (seconds each at "
         "these shapes) and the compiles the tests did not share"),
    Step("kgraph", "kernels", 25, 15.0,
         "do_bench of K1, K2, K2's floor (0.1 s each, events and graph replay), a 1 GiB copy and an 8192^3 "
         "product (0.2 s each), plus start-up and K1/K2 compiles (assumed 10 s)"),
    Step("k1k2", "kernels", 45, 25.0,
         "6 pytest-benchmark benchmarks (default: about 1 s each after 3 warm-up calls) + pytest start"),
    Step("k3", "kernels", 110, round(PYTEST_START_S + K3_INPUTS_S + K3_COMPILES_S + k3_calls(K3_FAST)
                                     + k3_calls(["tspo_logprobs", "one_product"], logprobs=True), 1),
         "measured per-call times (H200, 2026-11-26) x the calls of 11 fwd+bwd cases and 2 log-probs cases at "
         "N = 16384 and 32768, + pytest start, inputs and compiles (assumed 10 + 8 + 25 s)"),
    Step("liger", "kernels", 60, round(PYTEST_START_S + K3_INPUTS_S + 10.0
                                       + k3_calls(["liger_fused_linear_grpo", "liger_triton_grpo_loss"]), 1),
         "measured per-call times of Liger's two losses x 5 calls at both N, + pytest start, inputs and "
         "Liger's Triton compiles (assumed 10 + 8 + 10 s)"),
    Step("compile", "kernels", 85, round(PYTEST_START_S + K3_INPUTS_S + 45.0 + k3_calls(["compiled_eager"]), 1),
         "measured per-call times x 5 calls at both N, + pytest start and inputs, + torch.compile's two "
         "compiles (the second N recompiles; assumed 45 s in all: 'it compiles for a minute' was the only note)"),
    Step("update", "trainer", 110, 50.0,
         "assumption: a random Qwen2 of Qwen2.5-0.5B's shape built and saved (~1 GB), DeepSpeed ZeRO-3 start, "
         "2 layouts x (1 warm-up + 2 rounds) of a 40-row update (about 1 s each)"),
    Step("train", "trainer", 150, 90.0,
         "assumption: tspo-fast train, configs/tiny.yaml, HF engine, 3 steps: start-up (imports, ZeRO-3, BM25) "
         "~25 s, evaluation of 20 questions at steps 0 and 3, 3 steps of 40 rollouts, the final checkpoint"),
]


def steps_of(part: str, names: Optional[List[str]] = None) -> List[Step]:
    """The steps of ``part`` in run order (only ``names``, when given)."""
    if part not in PART_BUDGET_S:
        raise ValueError(f"--part: must be one of {', '.join(PART_BUDGET_S)}, got {part!r}")
    steps = [s for s in STEPS if s.part == part]
    if names is not None:
        unknown = sorted(set(names) - {s.name for s in steps})
        if unknown:
            raise ValueError(f"STEPS: {', '.join(unknown)} not a step of the {part} part "
                             f"({', '.join(s.name for s in steps)})")
        steps = [s for s in steps if s.name in names]
    return steps


def check_budgets() -> List[str]:
    """What is wrong with the table (empty when every part fits and every cap covers its estimate)."""
    problems = []
    for part, budget in PART_BUDGET_S.items():
        total = SETUP_S[part] + sum(s.cap_s for s in steps_of(part)) + WRAPUP_S
        if total > budget:
            problems.append(f"{part}: setup {SETUP_S[part]} s + caps + wrap-up {WRAPUP_S} s = {total} s > {budget} s")
    for s in STEPS:
        if s.cap_s < CAP_OVER_ESTIMATE * s.estimate_s:
            problems.append(f"{s.name}: cap {s.cap_s} s < {CAP_OVER_ESTIMATE} x its estimate {s.estimate_s} s")
    return problems


def step_limit(cap_s: int, elapsed_s: float, budget_s: float) -> int:
    """Seconds for a step that may run ``cap_s``: cut to what is left of ``budget_s`` after
    ``elapsed_s`` (the part's time so far), the interrupted step's grace and the wrap-up; 0 (skip)
    below :data:`MIN_STEP_S`."""
    left = int(budget_s - elapsed_s - KILL_GRACE_S - WRAPUP_S)
    lim = min(cap_s, left)
    return lim if lim >= MIN_STEP_S else 0


def table(part: str) -> str:
    """The part's steps with cap, estimate and basis (``python -m device_check plan``)."""
    steps = steps_of(part)
    lines = [f"part {part}: at most {PART_BUDGET_S[part]} s = setup {SETUP_S[part]} s + steps "
             f"{sum(s.cap_s for s in steps)} s (caps) + wrap-up {WRAPUP_S} s; expected about "
             f"{SETUP_S[part] + sum(s.estimate_s for s in steps) + WRAPUP_S:.0f} s"]
    for s in steps:
        lines.append(f"  {s.name:<8} cap {s.cap_s:>3} s  estimate {s.estimate_s:>5.1f} s  {s.basis}")
    return "\n".join(lines)
