"""``summary.txt`` of a part: the machine, test counts and failures, the K3 check, the benchmark
tables (mean / median per benchmark, each K3 variant's ratio to the floor and to the dense path,
peak memory, skipped fraction, chunk), the update and trainer figures, every step's time against
its cap and estimate, and last the verdicts (PASS / MISS / ---- per target).

``write_summary(part, out, work)`` reads ``out`` (env.txt, tests_junit.xml, ...) and ``work``
(the steps' logs and JSON), writes ``out/summary.txt`` (and ``out/bench.json``, every benchmark of
the run in one file) and returns the text.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List

from . import parse
from .budget import PART_BUDGET_S, STEPS
from .verdicts import (
    K3Index,
    Verdict,
    correctness_verdicts,
    fmt_s,
    fmt_x,
    impl_of,
    k1_k2_verdicts,
    k3_verdicts,
    kind_of,
    ratio,
    trainer_verdicts,
)


def _other_benchmarks(benches: List[dict]) -> List[str]:
    """Benchmarks outside the K3 CUDA tables, grouped; ``x ours`` = mean / our kernel's mean."""
    sets: Dict[str, list] = {}
    for b in benches:
        if kind_of(b):
            continue
        name, impl = b["name"], impl_of(b)
        if name.startswith("test_k1_"):
            s, ours = "K1 first occurrence", name == "test_k1_triton"
        elif name.startswith("test_k2_"):
            s, ours = "K2 turn advantages", name == "test_k2_triton"
        else:
            group = b.get("group") or "k3"
            s, ours = (f"{group} (CPU)", impl == "fused_torch_path") if group.startswith("k3-cpu") else (group, False)
        sets.setdefault(s, []).append((ours, b))
    if not sets:
        return []
    lines = ["== benchmarks (x ours = this mean / our kernel's mean in the same set; > 1: ours is faster)",
             f"   {'set':<28} {'benchmark':<44} {'mean':>10} {'median':>10} {'rounds':>6} {'x ours':>7}"]
    for s, items in sets.items():
        ours = [b["stats"]["mean"] for o, b in items if o]
        ref = ours[0] if ours else None
        for _, b in sorted(items, key=lambda ob: ob[1]["stats"]["mean"]):
            st = b["stats"]
            x = f"{st['mean'] / ref:.2f}" if ref else "-"
            lines.append(f"   {s[:28]:<28} {b['name'].replace('test_', '')[:44]:<44} {fmt_s(st['mean']):>10} "
                         f"{fmt_s(st['median']):>10} {st['rounds']:>6} {x:>7}")
    return lines


def _k3_tables(benches: List[dict]) -> List[str]:
    idx = K3Index(benches)
    lines = []
    for N in idx.Ns:
        rows = [b for (kind, n, _, _), b in idx.by.items() if kind == "fwd" and n == N]
        if rows:
            lines.append(f"== K3 forward + backward, N={N} (medians; x floor: / the matmul floor's on the same inputs; "
                         "x dense: / tspo_dense's)")
            lines.append(f"   {'inputs':<8} {'variant':<28} {'median':>10} {'rnd':>3} {'x floor':>7} {'x dense':>7} "
                         f"{'peak GiB':>8} {'skipped':>7} {'chunk':>11} acc")
            for b in sorted(rows, key=lambda b: (b.get("extra_info", {}).get("inputs", ""), b["stats"]["median"])):
                st, ex = b["stats"], b.get("extra_info", {})
                inp = ex.get("inputs", "uniform")
                fl = idx.median("fwd", N, "matmul_floor", inp) or idx.median("fwd", N, "matmul_floor")
                dn = idx.median("fwd", N, "tspo_dense", inp)
                sk = ex.get("skipped_fraction")
                ch = f"{ex['chunk_rows']} x{ex['chunks']}" if "chunk_rows" in ex else "-"
                lines.append(f"   {inp:<8} {impl_of(b)[:28]:<28} {fmt_s(st['median']):>10} {st['rounds']:>3} "
                             f"{fmt_x(ratio(st['median'], fl)):>7} {fmt_x(ratio(st['median'], dn)):>7} "
                             f"{ex.get('peak_extra_GiB', '-')!s:>8} {'-' if sk is None else f'{sk:.3f}':>7} {ch:>11} "
                             f"{ex.get('acc_strategy', '')}")
                if "entropy_median" in ex and impl_of(b) == "matmul_floor":
                    lines.append(f"   {'':<8} (LM-like inputs: entropy median {ex['entropy_median']} nats, top-1 "
                                 f"median {ex.get('top1_median')})")
        rows = [b for (kind, n, _, _), b in idx.by.items() if kind == "logprobs" and n == N]
        if rows:
            one = idx.median("logprobs", N, "one_product")
            lines.append(f"== K3 forward-only log-probs, N={N} (x one product: / one h W^T product's median)")
            for b in sorted(rows, key=lambda b: b["stats"]["median"]):
                st, ex = b["stats"], b.get("extra_info", {})
                lines.append(f"   {impl_of(b):<28} {fmt_s(st['median']):>10} {st['rounds']:>3} "
                             f"{fmt_x(ratio(st['median'], one)):>7}  peak {ex.get('peak_extra_GiB', '-')} GiB")
    return lines


def _update_lines(u: dict) -> List[str]:
    lines = [f"== ZeRO-3 update (bench/gpu_update_step.py): {u.get('device')}, {u.get('rows')} rows, "
             f"{u.get('tokens')} tokens"]
    for m, r in u.get("modes", {}).items():
        lines.append(f"   {m:11s} log-probs {fmt_s(r.get('logprobs_s'))}  update {fmt_s(r.get('update_s'))}  "
                     f"{r.get('tokens_per_s', 0):.0f} tokens/s  padding {r.get('padding_frac', 0):.2f}  "
                     f"peak {r.get('peak_gib')} GiB  micro-batches {r.get('micro_batches')}")
    return lines


def _trainer_lines(recs: List[dict]) -> List[str]:
    lines = [f"== trainer (tspo-fast train, configs/tiny.yaml, HF engine): {len(recs)} records"]
    for r in recs:
        if "time/step" in r:
            parts = "  ".join(f"{k[5:]} {fmt_s(v)}" for k, v in r.items() if k.startswith("time/") and k != "time/step")
            lines.append(f"   step {r.get('step')}: {fmt_s(r['time/step'])} ({parts}); "
                         f"{r.get('train/tokens_per_s', 0):.0f} tokens/s, reward {r.get('reward/mean')}")
        if "eval/em" in r:
            lines.append(f"   eval at step {r.get('step')}: EM {r['eval/em']}")
    return lines


def _step_lines(part: str, records: List[parse.StepRecord]) -> List[str]:
    if not records:
        return []
    caps = {s.name: s for s in STEPS if s.part == part}
    lines = [f"== steps (measured seconds against the limit each got, its cap and the estimate it is sized from; "
             f"part budget {PART_BUDGET_S.get(part, '-')} s)"]
    for r in records:
        s = caps.get(r.name)
        rc = "-" if r.rc is None else str(r.rc)
        extra = f"cap {s.cap_s} s, estimate {s.estimate_s:.0f} s" if s else ""
        note = "  <- cut at its time limit: partial results" if r.timed_out else (f"  ({r.note})" if r.note else "")
        lines.append(f"   {r.name:<8} rc {rc:>3}  {r.seconds:6.1f} s of {r.limit:>3} s  {extra}{note}")
    return lines


def build(part: str, out: str, work: str) -> str:
    lines: List[str] = []
    facts = parse.env_facts(os.path.join(out, "env.txt"))
    if facts:
        lines.append("== device: " + "; ".join(facts))
    verdicts: List[Verdict] = []
    if part == "kernels":
        tests = parse.junit(os.path.join(out, "tests_junit.xml"))
        lines.append(f"== tests: {tests.problem}" if tests.problem else
                     f"== tests: {tests.tests} run, {tests.passed} passed, {tests.failures} failed, {tests.errors} "
                     f"errors, {tests.skipped} skipped")
        lines += ["   " + f for f in tests.failed] + ["   skipped " + s for s in tests.skips[:20]]
        check = parse.check_lines(os.path.join(work, "k3check.log"))
        if check:
            lines.append("== K3 check on device tensors (the float64 reference)")
            lines += ["   " + c[:220] for c in check]
        benches, machine, problems = parse.benchmarks(work)
        lines += [f"== {p}" for p in problems]
        if benches:
            with open(os.path.join(out, "bench.json"), "w") as f:
                json.dump({"machine_info": machine, "benchmarks": benches}, f, indent=1)
        lines += _other_benchmarks(benches) + _k3_tables(benches)
        kgraph = parse.key_values(os.path.join(work, "kgraph.log"), "KGRAPH")
        if "ceiling_copy" in kgraph or "ceiling_bf16_mm" in kgraph:
            lines.append(f"== ceilings measured here: device-to-device copy {kgraph.get('ceiling_copy', {}).get('TBps', '-')}"
                         f" TB/s (read + write), 8192^3 bf16 product "
                         f"{kgraph.get('ceiling_bf16_mm', {}).get('TFLOPs', '-')} TFLOP/s (bench/RESULTS.md's model: "
                         "H200 4.3 TB/s and 790, H100 3.0 TB/s and 798)")
        if not benches:
            lines.append("== benchmarks: no results")
        verdicts = (correctness_verdicts(tests, check, parse.collected(os.path.join(out, "tests.log")))
                    + k3_verdicts(benches) + k1_k2_verdicts(benches, kgraph))
    elif part == "trainer":
        update = parse.json_file(os.path.join(work, "update_step.json"))
        if update is not None:
            lines += _update_lines(update)
        mpath = os.path.join(work, "train_run", "metrics.jsonl")
        metrics = parse.jsonl(mpath) if os.path.exists(mpath) else None
        if metrics is not None:
            lines += _trainer_lines(metrics)
        verdicts = trainer_verdicts(update, metrics)
    lines += _step_lines(part, parse.steps(os.path.join(work, "steps.txt")))
    lines.append(f"== verdicts, part {part} (PASS / MISS as measured in this run; ---- = not measured)")
    lines += ["   " + v.line() for v in verdicts]
    return "\n".join(lines) + "\n"


def write_summary(part: str, out: str, work: str) -> str:
    text = build(part, out, work)
    with open(os.path.join(out, "summary.txt"), "w") as f:
        f.write(text)
    return text
