"""The embedded default learns: README's first run raises greedy test EM by more than seeds vary.

The command is the README's main job as it is (``configs/tiny.yaml``: TSPO from the shipped warm
start, vLLM rollouts, DeepSpeed ZeRO-3 on the CPU, BM25 over the bundled world, its 24 steps,
about three minutes on 2 cores), with only the seed and the output folder set.  The trainer evaluates
the policy greedily on the first 100 test questions before the first step and every 4 steps.

The warm start answers from memory under greedy decoding (it never searches, EM ~0.04); with
sampling it searches about a third of the time.  The run must teach it to search and read.

SPREAD is the final test EM of this very command (``configs/tiny.yaml`` as shipped) for the 8
confirmation seeds of the pre-registered comparison, measured once on all 300 test questions with
``tspo-fast compare configs/tiny.yaml configs/tiny_grpo.yaml --seeds 5 ... 12 --eval-limit 0``
(bench/tspo_selection/confirmation.md).  MARGIN, the gain the test demands, is twice the
seed-to-seed range of the final EM or three binomial standard deviations of an EM on 100
questions, whichever is larger (0.146): a run that did not learn cannot pass by the luck of a
seed or of the evaluation; one that learnt as measured (gain about 0.33) passes with room.
"""
import json
import os
import subprocess
import sys

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TRAIN = yaml.safe_load(open(os.path.join(ROOT, "configs", "tiny.yaml")))["train"]
STEPS, EVAL_EVERY = _TRAIN["total_steps"], _TRAIN["eval_every"]     # the run as shipped
#: final test EM of configs/tiny.yaml per seed (measured 2026-12-02 on a 2-core CPU, 300 questions)
SPREAD = {5: 0.393, 6: 0.373, 7: 0.397, 8: 0.387, 9: 0.380, 10: 0.387, 11: 0.373, 12: 0.370}
EVAL_QUESTIONS = 100
_p = sum(SPREAD.values()) / len(SPREAD)
#: twice the seed-to-seed range, but at least three binomial standard deviations of an EM measured
#: on 100 questions (the seeds agreed more closely than one evaluation can resolve)
MARGIN = max(2 * (max(SPREAD.values()) - min(SPREAD.values())), 3 * (_p * (1 - _p) / EVAL_QUESTIONS) ** 0.5)
SEED = 4   # not one of the seeds SPREAD was measured on


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_tspo_raises_test_em_above_the_seed_spread(tmp_path, train_env):
    assert 0.1 < MARGIN < 0.3
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "tspo_fast.cli", "train", "--config", "configs/tiny.yaml", "--no-plot",
           "--set", f"output_dir={out}", "--set", f"seed={SEED}"]
    p = subprocess.run(cmd, cwd=ROOT, env=train_env, capture_output=True, text=True, timeout=1100)
    assert p.returncode == 0, p.stderr[-6000:]
    with open(out / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    evals = [r for r in rows if "eval/em" in r]
    assert [r["step"] for r in evals] == list(range(0, STEPS + 1, EVAL_EVERY))
    before, after = evals[0], evals[-1]
    gain = after["eval/em"] - before["eval/em"]
    assert gain > MARGIN, (f"test EM {before['eval/em']:.3f} -> {after['eval/em']:.3f}: "
                           f"the gain is not above the margin {MARGIN:.3f} (the confirmation seeds ended at {SPREAD})")
    assert after["eval/searches"] > before["eval/searches"]   # it learnt to search
    assert after["eval/answer_retrieved"] > before["eval/answer_retrieved"]
