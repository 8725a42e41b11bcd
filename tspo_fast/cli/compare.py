"""``tspo-fast compare A.yaml B.yaml``: train each config over several seeds and compare them.

Every (config, seed) pair is an ordinary ``tspo-fast train`` run in its own process, written
to ``<out>/<config name>/seed<S>``; a finished run (its metrics log reaches the last step) is
reused, so an interrupted comparison picks up where it stopped.  At the end the command writes

* ``<out>/compare.png``: test EM (mean over seeds, min-max band) and, from the training
  rollouts, the reward, searches per rollout, the share of all-fail groups and the FOLR hit rate
  (means over seeds, smoothed) against the step, one colour per config;
* ``<out>/compare.md`` and ``compare.json``: a table of test EM before and after training
  and averaged over the evaluations after step 0 (how fast it learnt; mean +- sample std over
  seeds, and each seed's EM at every evaluation), train reward, the share of all-fail groups
  and the FOLR hit rate over the last steps, and the wall time of each run;
* the **paired comparison** of every config with the baseline (``--baseline``, default the last
  config): the runs of one seed share the warm start and the data order, so per seed the
  difference in final test EM and in mean test EM over the evaluations after step 0, their
  mean, a 95% t-interval over seeds, and how many seeds each config wins, ties and loses.

``--eval-limit N`` sets ``data.eval_limit`` in every run (0: every test question).  ``--jobs N``
runs N runs at a time, each with its share of the cores (``OMP_NUM_THREADS`` = cores // N); the
default, 1, runs them one after the other, each with every core.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Sequence

from scipy import stats as scipy_stats
from tqdm import tqdm

from ..config import ConfigError, load_config
from ..training.metrics import read_metrics
from ..training.plots import plt, save_panels


def _name(config: str) -> str:
    return os.path.splitext(os.path.basename(config))[0]


def _finished(run_dir: str, total_steps: int) -> bool:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return False
    return any(r.get("step") == total_steps and "eval/em" in r for r in read_metrics(path))


def _train(cmd: List[str], threads: Optional[int] = None) -> None:
    """One training run in a fresh process (its own cores, its own DeepSpeed world); ``threads``:
    its intra-op threads (``OMP_NUM_THREADS``), None for the default (every core)."""
    env = None if threads is None else dict(os.environ, OMP_NUM_THREADS=str(threads))
    subprocess.run(cmd, check=True, env=env)


def run_one(config: str, seed: int, run_dir: str, overrides: Sequence[str], total_steps: int,
            threads: Optional[int] = None) -> float:
    """Train ``config`` with ``seed`` into ``run_dir`` (a fresh process with ``threads`` intra-op
    threads, None: every core); return wall seconds."""
    if _finished(run_dir, total_steps):
        return float("nan")
    if os.path.exists(os.path.join(run_dir, "metrics.jsonl")):  # an unfinished run: start it again
        shutil.rmtree(run_dir)
    cmd = [sys.executable, "-m", "tspo_fast.cli", "train", "--config", config, "--no-plot",
           "--set", f"seed={seed}", "--set", f"output_dir={run_dir}"]
    for o in overrides:
        cmd += ["--set", o]
    t0 = time.perf_counter()
    _train(cmd, threads)
    wall = time.perf_counter() - t0
    with open(os.path.join(run_dir, "wall_s.txt"), "w") as f:
        f.write(f"{wall:.1f}\n")
    return wall


def _mean_std(xs: Sequence[float]) -> Dict[str, float]:
    xs = [x for x in xs if x == x]
    if not xs:
        return {"mean": float("nan"), "std": float("nan")}
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0}


def summarize(out: str, configs: Sequence[str], seeds: Sequence[int], last_k: int = 5) -> Dict[str, dict]:
    """Per config: test EM at the first and last evaluation, and train statistics of the last steps."""
    table: Dict[str, dict] = {}
    for config in configs:
        name = _name(config)
        per_seed = []
        for seed in seeds:
            run_dir = os.path.join(out, name, f"seed{seed}")
            rows = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
            evals = [r for r in rows if "eval/em" in r]
            later = [r for r in evals if r["step"] > 0]               # train.eval_at_start: false has no step 0
            train = [r for r in rows if "reward/mean" in r][-last_k:]
            wall_path = os.path.join(run_dir, "wall_s.txt")
            per_seed.append({
                "seed": seed,
                "em_before": evals[0]["eval/em"] if evals[0]["step"] == 0 else float("nan"),
                "em_after": evals[-1]["eval/em"],
                # how fast it learnt: the mean test EM over the evaluations after step 0
                "em_during": statistics.fmean(r["eval/em"] for r in later) if later else float("nan"),
                "em_path": [(r["step"], r["eval/em"]) for r in evals],
                "retrieved_after": evals[-1].get("eval/answer_retrieved", float("nan")),
                "reward_last": statistics.fmean(r["reward/mean"] for r in train),
                "all_fail_last": statistics.fmean(r["reward/all_fail_groups"] for r in train),
                "folr_hit_last": statistics.fmean(r["reward/folr_hit"] for r in train),
                "wall_s": float(open(wall_path).read()) if os.path.exists(wall_path) else float("nan"),
            })
        agg = {k: _mean_std([s[k] for s in per_seed]) for k in per_seed[0] if k not in ("seed", "em_path")}
        agg["em_gain"] = _mean_std([s["em_after"] - s["em_before"] for s in per_seed])
        table[name] = {"per_seed": per_seed, "summary": agg}
    return table


def paired(table: Dict[str, dict], baseline: str) -> Dict[str, dict]:
    """Per config vs ``baseline``, per seed: differences of final and mean-of-later-evals test EM;
    mean, sample std, 95% t-interval over seeds, and wins / ties / losses."""
    base = {s["seed"]: s for s in table[baseline]["per_seed"]}
    out = {}
    for name, t in table.items():
        if name == baseline:
            continue
        res = {}
        for key, label in (("em_after", "final"), ("em_during", "mean_of_evals")):
            d = [s[key] - base[s["seed"]][key] for s in t["per_seed"] if s["seed"] in base]
            n = len(d)
            mean = statistics.fmean(d) if d else float("nan")
            sd = statistics.stdev(d) if n > 1 else float("nan")
            half = float(scipy_stats.t.ppf(0.975, n - 1)) * sd / n ** 0.5 if n > 1 else float("nan")
            res[label] = {"diff_per_seed": d, "mean": mean, "std": sd, "ci95": [mean - half, mean + half],
                          "wins": sum(x > 0 for x in d), "ties": sum(x == 0 for x in d), "losses": sum(x < 0 for x in d),
                          "n": n}
        out[name] = res
    return out


def paired_markdown(pairs: Dict[str, dict], baseline: str) -> str:
    lines = [f"Paired by seed against `{baseline}` (difference in test EM; 95% t-interval over seeds):", "",
             "| config | seeds | final EM diff | 95% CI | wins / ties / losses | mean-of-evals EM diff | 95% CI | "
             "wins / ties / losses |", "|---|---|---|---|---|---|---|---|"]
    for name, r in pairs.items():
        f, m = r["final"], r["mean_of_evals"]
        lines.append(f"| {name} | {f['n']} | {f['mean']:+.3f} ± {f['std']:.3f} | [{f['ci95'][0]:+.3f}, {f['ci95'][1]:+.3f}] | "
                     f"{f['wins']} / {f['ties']} / {f['losses']} | {m['mean']:+.3f} ± {m['std']:.3f} | "
                     f"[{m['ci95'][0]:+.3f}, {m['ci95'][1]:+.3f}] | {m['wins']} / {m['ties']} / {m['losses']} |")
    lines.append("")                          # the per-seed lines after the table, not inside it
    for name, r in pairs.items():
        lines.append(f"- {name}, final EM difference per seed: "
                     + ", ".join(f"{x:+.3f}" for x in r["final"]["diff_per_seed"]))
    return "\n".join(lines) + "\n"


def markdown(table: Dict[str, dict], last_k: int = 5) -> str:
    def ms(d):
        return f"{d['mean']:.3f} ± {d['std']:.3f}"
    lines = ["| config | test EM before | test EM after | gain | test EM, mean of later evals | answer retrieved (after) | "
             f"train reward (last {last_k}) | all-fail groups (last {last_k}) | FOLR hit (last {last_k}) | wall s/run |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, t in table.items():
        s = t["summary"]
        lines.append(f"| {name} | {ms(s['em_before'])} | {ms(s['em_after'])} | {ms(s['em_gain'])} | {ms(s['em_during'])} | "
                     f"{ms(s['retrieved_after'])} | {ms(s['reward_last'])} | {ms(s['all_fail_last'])} | "
                     f"{ms(s['folr_hit_last'])} | {s['wall_s']['mean']:.0f} |")
    lines += ["", "Per seed, test EM at each evaluation (step: EM):", ""]
    for name, t in table.items():
        for s in t["per_seed"]:
            lines.append(f"- {name}, seed {s['seed']}: " + " → ".join(f"{st}: {em:.3f}" for st, em in s["em_path"]))
    return "\n".join(lines) + "\n"


def plot(out: str, configs: Sequence[str], seeds: Sequence[int], png: str, smooth: int = 3) -> str:
    panels = [("eval/em", "test EM (greedy; band: ±1 sd over seeds)"), ("reward/mean", "train reward (outcome)"),
              ("rollout/searches", "searches per rollout"), ("reward/all_fail_groups", "all-fail groups"),
              ("reward/folr_hit", "FOLR hit (answer retrieved)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.3 * len(panels), 3.4))
    for ci, config in enumerate(configs):
        name, color = _name(config), f"C{ci}"
        runs = [read_metrics(os.path.join(out, name, f"seed{s}", "metrics.jsonl")) for s in seeds]
        for ax, (key, _title) in zip(axes, panels):
            series = [{r["step"]: r[key] for r in rows if key in r} for rows in runs]
            steps = sorted(set.intersection(*(set(s) for s in series))) if series else []
            if not steps:
                continue
            vals = [[s[st] for s in series] for st in steps]
            mean = [statistics.fmean(v) for v in vals]
            if key != "eval/em" and smooth > 1:  # trailing moving average of the noisy train curves
                mean = [statistics.fmean(mean[max(0, i - smooth + 1):i + 1]) for i in range(len(mean))]
            ax.plot(steps, mean, color=color, marker="o" if key == "eval/em" else None, ms=4,
                    label=f"{name} ({len(seeds)} seeds)")
            if key == "eval/em":               # band: mean +- one standard deviation over seeds
                sd = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in vals]
                ax.fill_between(steps, [m - d for m, d in zip(mean, sd)], [m + d for m, d in zip(mean, sd)],
                                color=color, alpha=0.2)
    return save_panels(fig, axes, [title for _, title in panels], png)


def compare(configs: Sequence[str], seeds: Sequence[int], out: str, overrides: Sequence[str] = (),
            baseline: Optional[str] = None, eval_limit: Optional[int] = None, jobs: int = 1) -> Dict[str, dict]:
    twice = sorted({s for s in seeds if list(seeds).count(s) > 1})
    if twice:
        raise ConfigError(f"--seeds: seed {twice[0]} is listed more than once ({' '.join(map(str, seeds))}); each "
                          "seed is one run, and a repeated one would be counted twice in the means and intervals")
    names = [_name(c) for c in configs]
    if len(set(names)) != len(names):
        raise ValueError(f"compare: config file names must differ (got {names})")
    baseline = _name(baseline) if baseline else names[-1]
    if baseline not in names:
        raise ValueError(f"compare: --baseline {baseline!r} is not one of the configs {names}")
    overrides = list(overrides) + ([f"data.eval_limit={eval_limit}"] if eval_limit is not None else [])
    totals = {c: load_config(c, list(overrides)).train.total_steps for c in configs}
    if jobs < 1:
        raise ValueError(f"--jobs: must be >= 1, got {jobs}")
    runs = [(c, s) for s in seeds for c in configs]           # seed by seed: early seeds complete first
    threads = None if jobs == 1 else max(1, (os.cpu_count() or 1) // jobs)
    bar = tqdm(total=len(runs), desc="compare", unit="run")

    def one(job):
        config, seed = job
        run_one(config, seed, os.path.join(out, _name(config), f"seed{seed}"), overrides, totals[config], threads)
        bar.update(1)
        bar.set_postfix(config=_name(config), seed=seed)

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for result in [pool.submit(one, job) for job in runs]:
            result.result()                                   # a failed run stops the comparison
    bar.close()
    table = summarize(out, configs, seeds)
    pairs = paired(table, baseline) if len(configs) > 1 else {}
    with open(os.path.join(out, "compare.json"), "w") as f:
        json.dump({"configs": list(configs), "seeds": list(seeds), "overrides": list(overrides), "baseline": baseline,
                   "table": table, "paired": pairs}, f, indent=1)
    with open(os.path.join(out, "compare.md"), "w") as f:
        f.write(markdown(table) + ("\n" + paired_markdown(pairs, baseline) if pairs else ""))
    plot(out, configs, seeds, os.path.join(out, "compare.png"))
    return table


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="tspo-fast compare", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("configs", nargs="+", help="two or more YAML configs (their file names label them)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--out", default="runs/compare")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a field in every config (repeatable)")
    ap.add_argument("--baseline", default=None, help="the config the others are paired against (default: the last)")
    ap.add_argument("--eval-limit", type=int, default=None,
                    help="data.eval_limit for every run (0: all test questions)")
    ap.add_argument("--jobs", type=int, default=1,
                    help="runs at a time, each with cores // jobs threads (default 1: one after the other)")
    args = ap.parse_args(argv)
    for c in args.configs:
        if not os.path.exists(c):
            ap.error(f"config not found: {c}")
    if args.jobs < 1:
        ap.error(f"--jobs: must be >= 1, got {args.jobs}")
    compare(args.configs, args.seeds, args.out, args.overrides, baseline=args.baseline, eval_limit=args.eval_limit,
            jobs=args.jobs)
    print(open(os.path.join(args.out, "compare.md")).read())
    print("figure:", os.path.join(args.out, "compare.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
