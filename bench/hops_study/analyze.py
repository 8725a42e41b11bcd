"""The hops study's pre-registered analysis (bench/hops_study/PROTOCOL.md), from `tspo-fast compare` output.

    python bench/hops_study/analyze.py power runs/hops_pilot/grpo_*/metrics.jsonl   # seeds needed
    python bench/hops_study/analyze.py tests runs/hops_confirm/compare.json          # the comparisons
    python bench/hops_study/analyze.py interim runs/hops_confirm                     # finished seeds so far

``power``: the primary endpoint (mean greedy test EM over the evaluations after step 0) of each
GRPO pilot run, its seed-to-seed sd s, and N = ceil(((z_{1-0.025/2} + z_{0.8}) * sqrt(2) * s / 0.03)^2) + 2;
with ``--runs-per-hour`` and ``--hours``, how many seeds of the four arms fit the budget and the
smallest effect those seeds detect with 80% power.

``tests``: per arm against GRPO, paired by seed, the primary endpoint's mean difference, its 95%
t-interval and two-sided paired t-test p-value, Holm-corrected over the primary family
(``tspo`` and ``tspo_stage`` against ``grpo``); final test EM's difference and the non-inferiority
check (the interval's lower end above -0.03); the TSPO arms against the placebo, and the placebo
against GRPO.  Writes a Markdown table (``--md``) and prints it.

``interim``: while the confirmation runs, the seeds whose four arms have all finished, per seed and
arm the test EM at each evaluation and the primary endpoint, and per arm the mean over those seeds.
Descriptive only (Amendment 1): no difference, interval or test is computed from it.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from typing import Dict, List, Sequence

from scipy import stats

PRIMARY_FAMILY = (("tspo", "grpo"), ("tspo_stage", "grpo"))
SECONDARY = (("tspo", "tspo_placebo"), ("tspo_stage", "tspo_placebo"), ("tspo_placebo", "grpo"))
DELTA = 0.03          # the difference the confirmation is powered for
MARGIN = -0.03        # non-inferiority margin on final test EM
ALPHA = 0.05


def primary_endpoint(rows: Sequence[dict]) -> float:
    """Mean test EM over the evaluations after step 0 of one run's metrics rows."""
    ems = [r["eval/em"] for r in rows if "eval/em" in r and r["step"] > 0]
    return statistics.fmean(ems) if ems else float("nan")


def seeds_needed(sd_run: float, delta: float = DELTA, alpha: float = ALPHA / 2, power: float = 0.8) -> int:
    """Seeds for ``power`` at ``delta`` in a paired two-sided test at level ``alpha``, the paired
    difference's sd taken as sqrt(2) * the runs' sd; +2 for the t-distribution."""
    z = stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power)
    return math.ceil((z * math.sqrt(2) * sd_run / delta) ** 2) + 2


def detectable(sd_run: float, n: int, alpha: float = ALPHA / 2, power: float = 0.8) -> float:
    """The smallest difference ``n`` paired seeds detect with ``power`` (t quantiles)."""
    if n < 3:
        return float("inf")
    t = stats.t.ppf(1 - alpha / 2, n - 1) + stats.t.ppf(power, n - 1)
    return t * math.sqrt(2) * sd_run / math.sqrt(n)


def paired_test(a: Dict[int, float], b: Dict[int, float]) -> dict:
    seeds = sorted(set(a) & set(b))
    d = [a[s] - b[s] for s in seeds]
    n = len(d)
    mean = statistics.fmean(d) if d else float("nan")
    sd = statistics.stdev(d) if n > 1 else float("nan")
    if n > 1 and sd > 0:
        half = stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
        p = 2 * stats.t.sf(abs(mean) / (sd / math.sqrt(n)), n - 1)
    else:
        half, p = float("nan"), float("nan")
    return {"n": n, "mean": mean, "sd": sd, "ci95": [mean - half, mean + half], "p": float(p),
            "wins": sum(x > 0 for x in d), "losses": sum(x < 0 for x in d), "per_seed": dict(zip(seeds, d))}


def holm(pvalues: Dict[str, float], alpha: float = ALPHA) -> Dict[str, dict]:
    """Holm's step-down: adjusted p-values and rejections at family-wise ``alpha``."""
    order = sorted(pvalues, key=lambda k: pvalues[k])
    m, out, running, stop = len(order), {}, 0.0, False
    for i, k in enumerate(order):
        adj = min(1.0, (m - i) * pvalues[k])
        running = max(running, adj)
        reject = bool(not stop and pvalues[k] <= alpha / (m - i))
        stop = stop or not reject
        out[k] = {"p": float(pvalues[k]), "p_holm": float(running), "reject": reject}
    return out


def per_seed(table: dict, arm: str, key: str) -> Dict[int, float]:
    return {s["seed"]: s[key] for s in table[arm]["per_seed"]}


def tests(compare_json: str) -> dict:
    data = json.load(open(compare_json))
    table = data["table"]
    res = {"primary": {}, "final": {}, "secondary": {}}
    for arm, base in PRIMARY_FAMILY:
        if arm in table and base in table:
            res["primary"][f"{arm} - {base}"] = paired_test(per_seed(table, arm, "em_during"), per_seed(table, base, "em_during"))
            fin = paired_test(per_seed(table, arm, "em_after"), per_seed(table, base, "em_after"))
            fin["non_inferior"] = bool(fin["ci95"][0] > MARGIN)
            res["final"][f"{arm} - {base}"] = fin
    adj = holm({k: v["p"] for k, v in res["primary"].items()})
    for k, v in adj.items():
        res["primary"][k].update(p_holm=v["p_holm"], reject=v["reject"])
    for arm, base in SECONDARY:
        if arm in table and base in table:
            res["secondary"][f"{arm} - {base}"] = {
                "mean_of_evals": paired_test(per_seed(table, arm, "em_during"), per_seed(table, base, "em_during")),
                "final": paired_test(per_seed(table, arm, "em_after"), per_seed(table, base, "em_after"))}
    res["ships"] = ships(res)
    return res


def ships(res: dict) -> dict:
    """PROTOCOL.md "What ships": the TSPO arms that beat GRPO on the primary endpoint after Holm
    (in the positive direction) and are non-inferior on final EM; of several, the larger mean
    primary difference; of none, the arm with the larger mean primary difference, marked as not
    favoured over GRPO."""
    diffs = {k.split(" - ")[0]: r for k, r in res["primary"].items()}
    winners = [a for a, r in diffs.items()
               if r.get("reject") and r["mean"] > 0 and res["final"][f"{a} - grpo"]["non_inferior"]]
    pool = winners or list(diffs)
    arm = max(pool, key=lambda a: diffs[a]["mean"]) if pool else None
    return {"arm": arm, "beats_grpo": bool(winners), "winners": winners}


def markdown(res: dict) -> str:
    def ci(r):
        return f"[{r['ci95'][0]:+.3f}, {r['ci95'][1]:+.3f}]"
    lines = ["Primary endpoint: mean test EM over the evaluations after step 0 (paired by seed; two-sided paired "
             "t-test, Holm over the family):", "",
             "| comparison | seeds | difference | 95% CI | p | p (Holm) | significant | wins / losses |",
             "|---|---|---|---|---|---|---|---|"]
    for k, r in res["primary"].items():
        lines.append(f"| {k} | {r['n']} | {r['mean']:+.4f} ± {r['sd']:.4f} | {ci(r)} | {r['p']:.3g} | "
                     f"{r.get('p_holm', float('nan')):.3g} | {'yes' if r.get('reject') else 'no'} | "
                     f"{r['wins']} / {r['losses']} |")
    lines += ["", f"Final test EM (non-inferiority margin {MARGIN:+.2f}):", "",
              "| comparison | difference | 95% CI | non-inferior | wins / losses |", "|---|---|---|---|---|"]
    for k, r in res["final"].items():
        lines.append(f"| {k} | {r['mean']:+.4f} ± {r['sd']:.4f} | {ci(r)} | {'yes' if r['non_inferior'] else 'no'} | "
                     f"{r['wins']} / {r['losses']} |")
    lines += ["", "Secondary (FOLR's information: TSPO arms against the placebo; added variance: placebo against GRPO):",
              "", "| comparison | mean-of-evals difference | 95% CI | p | final difference | 95% CI |",
              "|---|---|---|---|---|---|"]
    for k, r in res["secondary"].items():
        m, f = r["mean_of_evals"], r["final"]
        lines.append(f"| {k} | {m['mean']:+.4f} | {ci(m)} | {m['p']:.3g} | {f['mean']:+.4f} | {ci(f)} |")
    if res.get("ships", {}).get("arm"):
        sh = res["ships"]
        lines += ["", f"What ships (PROTOCOL.md): `{sh['arm']}`, "
                  + ("which beats GRPO on the primary endpoint after Holm and is non-inferior on final EM"
                     if sh["beats_grpo"] else "the TSPO arm with the larger mean primary difference; "
                     "the evidence does not favour it over GRPO") + "."]
    return "\n".join(lines) + "\n"


ARMS = ("grpo", "tspo", "tspo_stage", "tspo_placebo")


def _finished_rows(run_dir: str, total_steps: int):
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return None
    rows = [json.loads(x) for x in open(path) if x.strip()]
    done = any(r.get("step") == total_steps and "eval/em" in r for r in rows)
    return rows if done else None


def interim(out: str, total_steps: int = 24) -> dict:
    """{seed: {arm: {"path": [(step, em)], "primary": float, "final": float}}} for every seed of
    ``out`` (a compare folder: ``<arm>/seed<N>/metrics.jsonl``) whose four arms have finished."""
    seeds = sorted({int(d[4:]) for arm in ARMS if os.path.isdir(os.path.join(out, arm))
                    for d in os.listdir(os.path.join(out, arm)) if d.startswith("seed") and d[4:].isdigit()})
    table = {}
    for seed in seeds:
        runs = {arm: _finished_rows(os.path.join(out, arm, f"seed{seed}"), total_steps) for arm in ARMS}
        if any(rows is None for rows in runs.values()):
            continue
        table[seed] = {arm: {"path": [(r["step"], r["eval/em"]) for r in rows if "eval/em" in r],
                             "primary": primary_endpoint(rows),
                             "final": [r["eval/em"] for r in rows if "eval/em" in r][-1]} for arm, rows in runs.items()}
    return table


def interim_markdown(table: dict) -> str:
    lines = [f"Interim, descriptive only: {len(table)} seed(s) with all four arms finished "
             f"({', '.join(map(str, table)) or 'none'}); no test is read from this table.", "",
             "| seed | " + " | ".join(f"{a}: EM at steps (primary)" for a in ARMS) + " |",
             "|---|" + "---|" * len(ARMS)]
    for seed, arms in table.items():
        cells = [" / ".join(f"{em:.3f}" for _, em in arms[a]["path"]) + f" ({arms[a]['primary']:.3f})" for a in ARMS]
        lines.append(f"| {seed} | " + " | ".join(cells) + " |")
    if table:
        means = [statistics.fmean(t[a]["primary"] for t in table.values()) for a in ARMS]
        finals = [statistics.fmean(t[a]["final"] for t in table.values()) for a in ARMS]
        lines.append("| mean | " + " | ".join(f"final {f:.3f} (primary {m:.3f})" for m, f in zip(means, finals)) + " |")
    return "\n".join(lines) + "\n"


def main(argv: List[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("power")
    p.add_argument("metrics", nargs="+", help="metrics.jsonl of GRPO pilot runs (one per seed)")
    p.add_argument("--run-minutes", type=float, default=None, help="wall minutes of one run (two run at a time)")
    p.add_argument("--hours", type=float, default=6.0)
    p.add_argument("--parallel", type=int, default=2)
    t = sub.add_parser("tests")
    t.add_argument("compare_json")
    t.add_argument("--md", default=None)
    t.add_argument("--json", default=None)
    i = sub.add_parser("interim")
    i.add_argument("out", help="the confirmation's compare folder (runs/hops_confirm)")
    i.add_argument("--total-steps", type=int, default=24)
    i.add_argument("--md", default=None)
    args = ap.parse_args(argv)
    if args.cmd == "interim":
        md = interim_markdown(interim(args.out, args.total_steps))
        print(md)
        if args.md:
            open(args.md, "w").write(md)
        return 0
    if args.cmd == "power":
        values = [primary_endpoint([json.loads(x) for x in open(m) if x.strip()]) for m in args.metrics]
        s = statistics.stdev(values)
        n = seeds_needed(s)
        print(f"primary endpoint per pilot run: {', '.join(f'{v:.4f}' for v in values)}")
        print(f"seed-to-seed sd s = {s:.4f}; paired-difference sd taken as sqrt(2) s = {math.sqrt(2) * s:.4f}")
        print(f"seeds for 80% power at {DELTA} (two-sided, level {ALPHA / 2}): N = {n}")
        if args.run_minutes:
            fit = int(args.hours * 60 * args.parallel / (4 * args.run_minutes))
            print(f"four arms x {fit} seeds fit {args.hours} h at {args.run_minutes} min per run, {args.parallel} "
                  f"at a time; with {min(n, fit)} seeds the smallest effect detected with 80% power is "
                  f"{detectable(s, min(n, fit)):.4f}")
        return 0
    res = tests(args.compare_json)
    md = markdown(res)
    print(md)
    if args.md:
        open(args.md, "w").write(md)
    if args.json:
        json.dump(res, open(args.json, "w"), indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
