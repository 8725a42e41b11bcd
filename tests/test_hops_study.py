"""The hops study's analysis (bench/hops_study/analyze.py): Holm's step-down, the paired t-test and
the power rule, against values worked out by hand or by scipy directly."""
import json
import math
import os
import random
import sys

import pytest
from scipy import stats

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "hops_study"))

import analyze  # bench/hops_study is not a package: its folder goes on the path first


def test_holm_step_down_by_hand():
    # m = 3: compare p(1) with 0.05/3, p(2) with 0.05/2, p(3) with 0.05; stop at the first failure
    res = analyze.holm({"a": 0.01, "b": 0.04, "c": 0.03})
    assert res["a"]["reject"] and not res["c"]["reject"] and not res["b"]["reject"]
    assert res["a"]["p_holm"] == pytest.approx(0.03) and res["c"]["p_holm"] == pytest.approx(0.06)
    assert res["b"]["p_holm"] == pytest.approx(0.06)        # monotone: max(0.04, 0.06)
    res = analyze.holm({"a": 0.001, "b": 0.02})
    assert res["a"]["reject"] and res["b"]["reject"]


def test_paired_test_matches_scipy():
    a = {1: 0.50, 2: 0.61, 3: 0.47, 4: 0.58, 5: 0.55}
    b = {1: 0.45, 2: 0.60, 3: 0.40, 4: 0.50, 5: 0.56, 9: 0.1}      # seed 9 has no pair: left out
    r = analyze.paired_test(a, b)
    want = stats.ttest_rel([a[s] for s in sorted(a)], [b[s] for s in sorted(a)])
    assert r["n"] == 5 and r["p"] == pytest.approx(want.pvalue)
    assert r["mean"] == pytest.approx(0.04) and r["wins"] == 4 and r["losses"] == 1
    lo, hi = r["ci95"]
    assert lo < r["mean"] < hi and (hi - lo) / 2 == pytest.approx(stats.t.ppf(0.975, 4) * r["sd"] / math.sqrt(5))


def test_power_rule():
    # z_{0.9875} + z_{0.8} = 2.2414 + 0.8416 = 3.083; sd_diff = sqrt(2) * 0.02; N = ceil((3.083 * 0.02828 / 0.03)^2) + 2
    assert analyze.seeds_needed(0.02) == math.ceil((3.0830 * math.sqrt(2) * 0.02 / 0.03) ** 2) + 2 == 11
    # the seeds the rule asks for detect the powered-for effect (t quantiles: a little above 0.03 at most)
    n = analyze.seeds_needed(0.02)
    assert analyze.detectable(0.02, n) == pytest.approx(0.03, abs=0.004)
    assert analyze.detectable(0.02, 2 * n) < analyze.detectable(0.02, n)


def test_primary_endpoint_leaves_out_step_zero():
    rows = [{"step": 0, "eval/em": 0.1}, {"step": 1, "reward/mean": 0.5}, {"step": 10, "eval/em": 0.4},
            {"step": 20, "eval/em": 0.6}]
    assert analyze.primary_endpoint(rows) == pytest.approx(0.5)


def _run(folder, ems, last_step=24):
    folder.mkdir(parents=True)
    rows = [{"step": s, "reward/mean": 0.1} for s in range(1, last_step + 1)]
    rows += [{"step": s, "eval/em": em} for s, em in zip((8, 16, 24), ems) if s <= last_step]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_interim_keeps_only_seeds_whose_four_arms_finished(tmp_path):
    for arm, ems in zip(analyze.ARMS, ([0.4, 0.5, 0.6], [0.5, 0.5, 0.5], [0.3, 0.3, 0.6], [0.1, 0.2, 0.3])):
        _run(tmp_path / arm / "seed201", ems)
        _run(tmp_path / arm / "seed202", ems, last_step=24 if arm != "tspo" else 16)   # one arm unfinished
    table = analyze.interim(str(tmp_path))
    assert list(table) == [201]
    assert table[201]["grpo"]["primary"] == pytest.approx(0.5) and table[201]["grpo"]["final"] == 0.6
    assert table[201]["tspo_stage"]["path"] == [(8, 0.3), (16, 0.3), (24, 0.6)]
    md = analyze.interim_markdown(table)
    assert "descriptive only: 1 seed(s)" in md and "| 201 | 0.400 / 0.500 / 0.600 (0.500) |" in md
    assert "p=" not in md and "interval" not in md


def _compare_json(path, em_during, em_after):
    """A ``tspo-fast compare`` table with the given per-arm per-seed endpoints."""
    table = {arm: {"per_seed": [{"seed": s, "em_during": d, "em_after": a}
                                for s, (d, a) in enumerate(zip(em_during[arm], em_after[arm]))]}
             for arm in em_during}
    path.write_text(json.dumps({"table": table}))
    return str(path)


@pytest.mark.parametrize("case,want", [
    ("stage_wins", ("tspo_stage", True)),
    ("both_win", ("tspo", True)),
    ("neither", ("tspo_stage", False)),
    ("wins_but_inferior_final", ("tspo_stage", False)),
])
def test_what_ships_follows_the_protocol(tmp_path, case, want):
    rng = random.Random(7)
    n = 21
    base = [0.48 + rng.gauss(0, 0.03) for _ in range(n)]
    shift = {"stage_wins": (0.0, 0.03), "both_win": (0.05, 0.03), "neither": (0.0, 0.002),
             "wins_but_inferior_final": (0.0, 0.03)}[case]
    during = {"grpo": base, "tspo_placebo": [b - 0.02 for b in base]}
    during["tspo"] = [b + shift[0] + rng.gauss(0, 0.01) for b in base]
    during["tspo_stage"] = [b + shift[1] + rng.gauss(0, 0.01) for b in base]
    after = {k: list(v) for k, v in during.items()}
    if case == "wins_but_inferior_final":
        after["tspo_stage"] = [b - 0.08 for b in base]
    res = analyze.tests(_compare_json(tmp_path / "compare.json", during, after))
    assert (res["ships"]["arm"], res["ships"]["beats_grpo"]) == want
    json.dumps(res)                                # the --json output: plain types only
    assert "What ships" in analyze.markdown(res)
