"""The SmolLM2 RL criterion (bench/smollm2_rl.py) on metrics logs written here: the threshold by
hand, a run that passes, one that does not, and the logs it refuses, naming the file."""
import json
import math
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

import smollm2_rl  # bench/ is not a package: its folder goes on the path first


def _run(folder, evals, n=300, steps=12, wall=None):
    os.makedirs(folder)
    rows = [{"step": s, "reward/mean": 0.1, "time/step": 10.0} for s in range(1, steps + 1)]
    for step, em in evals:
        row = {"step": step, "eval/em": em, "eval/n": n, "eval/searches": 0.2 + em}
        if step:
            rows[step - 1].update(row)
        else:
            rows.insert(0, row)
    with open(os.path.join(folder, "metrics.jsonl"), "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    if wall is not None:
        open(os.path.join(folder, "wall_s.txt"), "w").write(str(wall))
    return str(folder)


def test_threshold_by_hand():
    assert smollm2_rl.threshold(0.2, 300) == pytest.approx(3 * math.sqrt(0.2 * 0.8 / 300))   # 0.0693
    assert smollm2_rl.threshold(0.0, 300) == pytest.approx(3 * math.sqrt((1 / 300) * (299 / 300) / 300))


def test_a_run_that_passes_and_one_that_does_not(tmp_path, capsys):
    good = _run(tmp_path / "good", [(0, 0.20), (12, 0.30)], wall=900)      # +0.100 > 0.069
    flat = _run(tmp_path / "flat", [(0, 0.20), (12, 0.25)])                # +0.050 < 0.069
    r = smollm2_rl.run_result(good)
    assert r["passes"] and r["gain"] == pytest.approx(0.10) and r["steps_s"] == 120.0 and r["wall_s"] == 900.0
    assert not smollm2_rl.run_result(flat)["passes"]
    md = tmp_path / "rl.md"
    assert smollm2_rl.main([good, flat, "--md", str(md)]) == 0
    text = md.read_text()
    assert "Every run passes: **no** (1 of 2)" in text and text == capsys.readouterr().out
    assert "| 0.200 | 0.300 | +0.100 | 0.069 | yes |" in text and "| 120 | 900 |" in text and "| 120 | n/a |" in text


def test_logs_it_cannot_judge_are_named(tmp_path):
    with pytest.raises(SystemExit, match="no metrics.jsonl"):
        smollm2_rl.run_result(str(tmp_path))
    late = _run(tmp_path / "late", [(6, 0.2), (12, 0.3)])                   # no evaluation before RL
    with pytest.raises(SystemExit, match=r"late/metrics.jsonl: needs an evaluation at step 0"):
        smollm2_rl.run_result(late)
    os.makedirs(tmp_path / "mixed")
    with open(tmp_path / "mixed" / "metrics.jsonl", "w") as f:
        f.write(json.dumps({"step": 0, "eval/em": 0.2, "eval/n": 100}) + "\n")
        f.write(json.dumps({"step": 12, "eval/em": 0.3, "eval/n": 300}) + "\n")
    with pytest.raises(SystemExit, match="must use the same questions"):
        smollm2_rl.run_result(str(tmp_path / "mixed"))
