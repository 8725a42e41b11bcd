"""``tspo-fast compare``: table, figure and reuse of finished runs (the runs themselves are the
ordinary trainer, exercised by test_trainer.py and test_learning.py)."""
import json
import os
import random
import shutil
import statistics

import pytest

from tspo_fast.cli import compare


def _write_run(run_dir, total, em0, em1, rng):
    os.makedirs(run_dir, exist_ok=True)
    rows = [{"step": 0, "eval/em": em0, "eval/answer_retrieved": 0.2}]
    for step in range(1, total + 1):
        row = {"step": step, "reward/mean": rng.random(), "reward/em": rng.random() / 2,
               "reward/all_fail_groups": rng.random(), "reward/folr_hit": rng.random(),
               "rollout/searches": 2 * rng.random()}
        if step == total // 2:
            row.update({"eval/em": (em0 + em1) / 2, "eval/answer_retrieved": 0.3})
        if step == total:
            row.update({"eval/em": em1, "eval/answer_retrieved": 0.4})
        rows.append(row)
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return rows


def _config(tmp_path, name, steps):
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"train:\n  total_steps: {steps}\n")
    return str(path)


def test_compare_reuses_finished_runs_and_summarises(tmp_path, monkeypatch):
    rng = random.Random(0)
    out = tmp_path / "cmp"
    a, b = _config(tmp_path, "a", 6), _config(tmp_path, "b", 6)
    ems = {("a", 1): (0.1, 0.3), ("a", 2): (0.2, 0.25), ("b", 1): (0.1, 0.15), ("b", 2): (0.2, 0.2)}
    logs = {k: _write_run(str(out / k[0] / f"seed{k[1]}"), 6, *v, rng) for k, v in ems.items()}

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")
    monkeypatch.setattr(compare, "_train", no_training)
    table = compare.compare([a, b], [1, 2], str(out))

    sa = table["a"]["summary"]
    assert sa["em_before"]["mean"] == pytest.approx(0.15)
    assert sa["em_after"]["mean"] == pytest.approx(0.275)
    assert sa["em_gain"]["mean"] == pytest.approx((0.2 + 0.05) / 2)
    assert sa["em_after"]["std"] == pytest.approx(0.035355339, rel=1e-6)
    assert table["a"]["per_seed"][0]["em_during"] == pytest.approx((0.2 + 0.3) / 2)
    assert sa["em_during"]["mean"] == pytest.approx(((0.2 + 0.3) / 2 + (0.225 + 0.25) / 2) / 2)
    last5 = [r["reward/mean"] for r in logs[("b", 2)] if "reward/mean" in r][-5:]
    assert table["b"]["per_seed"][1]["reward_last"] == pytest.approx(sum(last5) / 5)
    md = (out / "compare.md").read_text()
    assert "| a | 0.150 ± 0.071 | 0.275 ± 0.035 |" in md
    assert "- b, seed 2: 0: 0.200 → 3: 0.200 → 6: 0.200" in md
    assert "- a, seed 1: 0: 0.100 → 3: 0.200 → 6: 0.300" in md
    assert (out / "compare.png").stat().st_size > 10_000
    assert json.loads((out / "compare.json").read_text())["seeds"] == [1, 2]


def test_unfinished_run_is_started_again(tmp_path, monkeypatch):
    rng = random.Random(1)
    out = tmp_path / "cmp"
    a = _config(tmp_path, "a", 6)
    _write_run(str(out / "a" / "seed1"), 4, 0.1, 0.2, rng)   # stopped at step 4 of 6
    calls = []

    def fake_train(cmd, threads=None):
        calls.append(cmd)
        assert not (out / "a" / "seed1").exists(), "the stale run folder must be cleared first"
        _write_run(str(out / "a" / "seed1"), 6, 0.1, 0.2, rng)
    monkeypatch.setattr(compare, "_train", fake_train)
    compare.compare([a], [1], str(out), ["train.lr=0.5"])
    assert len(calls) == 1
    assert calls[0][-2:] == ["--set", "train.lr=0.5"] and f"output_dir={out / 'a' / 'seed1'}" in calls[0]


def test_same_config_names_are_refused(tmp_path):
    (tmp_path / "x").mkdir()
    a = _config(tmp_path, "a", 2)
    shutil.copy(a, tmp_path / "x" / "a.yaml")
    with pytest.raises(ValueError, match="names must differ"):
        compare.compare([a, str(tmp_path / "x" / "a.yaml")], [1], str(tmp_path / "out"))


def test_paired_comparison_by_seed(tmp_path, monkeypatch):
    """Per seed differences against the baseline, their mean, a 95% t-interval and wins/ties/losses."""
    rng = random.Random(3)
    out = tmp_path / "cmp"
    a, b = _config(tmp_path, "tspo", 6), _config(tmp_path, "grpo", 6)
    ems = {("tspo", 1): (0.1, 0.30), ("tspo", 2): (0.1, 0.25), ("tspo", 3): (0.1, 0.20),
           ("grpo", 1): (0.1, 0.20), ("grpo", 2): (0.1, 0.25), ("grpo", 3): (0.1, 0.25)}
    for k, v in ems.items():
        _write_run(str(out / k[0] / f"seed{k[1]}"), 6, *v, rng)
    monkeypatch.setattr(compare, "_train", lambda cmd, threads=None: (_ for _ in ()).throw(AssertionError("trained again")))
    compare.compare([a, b], [1, 2, 3], str(out), eval_limit=0)
    res = json.load(open(out / "compare.json"))
    assert res["baseline"] == "grpo" and "data.eval_limit=0" in res["overrides"]
    f = res["paired"]["tspo"]["final"]
    assert f["diff_per_seed"] == pytest.approx([0.10, 0.0, -0.05])
    assert (f["wins"], f["ties"], f["losses"]) == (1, 1, 1)
    mean, sd = 0.05 / 3, statistics.stdev([0.10, 0.0, -0.05])
    assert f["mean"] == pytest.approx(mean) and f["std"] == pytest.approx(sd)
    half = 4.302652729911275 * sd / 3 ** 0.5          # t(0.975, df=2)
    assert f["ci95"] == pytest.approx([mean - half, mean + half])
    md = (out / "compare.md").read_text()
    assert "Paired by seed against `grpo`" in md and "| tspo | 3 | +0.017" in md
    with pytest.raises(ValueError, match="--baseline"):
        compare.compare([a, b], [1], str(out), baseline="other")


def test_jobs_run_at_once_with_their_share_of_the_cores(tmp_path, monkeypatch):
    """--jobs 2: two runs in flight together, each told cores // 2 threads; every run is done once."""
    import threading
    import time

    rng = random.Random(2)
    out = tmp_path / "cmp"
    a, b = _config(tmp_path, "a", 3), _config(tmp_path, "b", 3)
    lock, state = threading.Lock(), {"now": 0, "most": 0, "threads": set(), "dirs": []}

    def fake_train(cmd, threads=None):
        with lock:
            state["now"] += 1
            state["most"] = max(state["most"], state["now"])
            state["threads"].add(threads)
        time.sleep(0.3)
        run_dir = next(x.split("=", 1)[1] for x in cmd if x.startswith("output_dir="))
        _write_run(run_dir, 3, 0.1, 0.2, rng)
        with lock:
            state["now"] -= 1
            state["dirs"].append(run_dir)
    monkeypatch.setattr(compare, "_train", fake_train)
    monkeypatch.setattr(compare.os, "cpu_count", lambda: 4)
    compare.compare([a, b], [1, 2], str(out), jobs=2)
    assert state["most"] == 2 and state["threads"] == {2}
    assert sorted(state["dirs"]) == sorted(str(out / c / f"seed{s}") for c in ("a", "b") for s in (1, 2))
    with pytest.raises(ValueError, match="--jobs: must be >= 1"):
        compare.compare([a], [1], str(out), jobs=0)


def test_runs_without_a_step_zero_evaluation(tmp_path):
    """train.eval_at_start: false: no 'before' value, and the mean over evaluations counts every one
    (after step 0) rather than dropping the first."""
    rng = random.Random(3)
    out = tmp_path / "cmp"
    a = _config(tmp_path, "a", 6)
    rows = _write_run(str(out / "a" / "seed1"), 6, 0.1, 0.5, rng)
    with open(out / "a" / "seed1" / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows[1:])             # the step-0 row left out
    table = compare.summarize(str(out), [a], [1])
    s = table["a"]["per_seed"][0]
    assert s["em_before"] != s["em_before"]                                # NaN: not measured
    assert s["em_during"] == pytest.approx((0.3 + 0.5) / 2) and s["em_after"] == 0.5
