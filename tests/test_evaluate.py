"""Evaluation (tspo_fast/training/evaluate.py): with several ranks each rolls out its share of
the test set and every rank gets the world-size-1 result."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _procs import torchrun

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).with_name("_eval_ws2.py")


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_world_size_2_shards_the_test_set_and_matches_world_size_1(tmp_path):
    """21 questions over 2 ranks (torchrun, gloo): rank 0 rolls out 11, rank 1 10 (not all 21
    each), and both ranks return exactly the single-process result (one of the 21 is answered
    right by the warm start, so the EMs are not all zero)."""
    n = 21
    one, two = tmp_path / "ws1", tmp_path / "ws2"
    one.mkdir()
    two.mkdir()
    p = subprocess.run([sys.executable, str(SCRIPT), str(one), str(n)], cwd=ROOT, env=_env(), capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-4000:]
    p = subprocess.run(torchrun() + [str(SCRIPT), str(two), str(n)], cwd=ROOT, env=_env(), capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-4000:]
    ws1 = json.loads((one / "eval_0.json").read_text())
    ranks = [json.loads((two / f"eval_{r}.json").read_text()) for r in range(2)]
    assert ws1["world"] == 1 and ws1["questions"] == n
    assert [r["world"] for r in ranks] == [2, 2]
    assert [r["questions"] for r in ranks] == [11, 10]          # each rank its share, not the whole set
    assert ws1["result"]["overall"]["n"] == n and ws1["result"]["overall"]["em"] > 0
    for r in ranks:
        assert r["result"] == ws1["result"]
