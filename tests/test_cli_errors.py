"""The command line as a hostile user meets it: each wrong or unclear case of the second pass ends
in one line naming the option, field, file or row (exit 1), or in a correct result; stdout keeps
the command's own output (no DeepSpeed notice).  Cases that need a training run are in
test_faults.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tspo_fast.cli import main
from tspo_fast.training.plots import PANELS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")


def _error(capsys, command: str) -> str:
    """The command's one error line (the last of stderr; no traceback)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert lines and lines[-1].startswith(f"tspo-fast {command}: error: "), err
    return lines[-1][len(f"tspo-fast {command}: error: "):]


def test_negative_max_steps_is_refused(capsys, tmp_path):
    assert main(["train", "--config", TINY, "--max-steps", "-3", "--set", f"output_dir={tmp_path}"]) == 1
    assert _error(capsys, "train") == "--max-steps: must be >= 0, got -3"
    assert not os.listdir(tmp_path)                          # nothing started, nothing written


def test_negative_eval_limit_is_refused(capsys):
    assert main(["eval", "--config", TINY, "--limit", "-3"]) == 1
    assert _error(capsys, "eval") == "--limit: must be >= 0 (0 = every test question), got -3"


def test_eval_on_an_empty_checkpoints_folder_names_it(capsys, tmp_path):
    empty = tmp_path / "checkpoints"
    empty.mkdir()
    assert main(["eval", "--config", TINY, "--checkpoint", str(empty)]) == 1
    assert _error(capsys, "eval").startswith(f"--checkpoint: {empty} holds no checkpoint: give a model folder")


def test_compare_refuses_a_seed_given_twice(capsys, tmp_path):
    assert main(["compare", TINY, TINY.replace("tiny", "tiny_grpo"), "--seeds", "1", "1", "--out", str(tmp_path)]) == 1
    assert _error(capsys, "compare").startswith("--seeds: seed 1 is listed more than once (1 1)")
    assert not os.listdir(tmp_path)


def _log(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_plot_of_an_empty_log_and_too_few_labels(capsys, tmp_path):
    _log(tmp_path / "empty" / "metrics.jsonl", [])
    png = tmp_path / "c.png"
    assert main(["plot", str(tmp_path / "empty"), "--out", str(png)]) == 1
    drawn = ", ".join(key for key, _ in PANELS)
    assert _error(capsys, "plot") == (f"{tmp_path / 'empty' / 'metrics.jsonl'}: the metrics log has no {drawn} "
                                      "values (0 row(s)): nothing to plot")
    assert not png.exists()                                   # no blank PNG
    for name in ("a", "b"):
        _log(tmp_path / name / "metrics.jsonl", [{"step": s, "reward/mean": 0.1 * s} for s in range(1, 4)])
    runs = [str(tmp_path / "a"), str(tmp_path / "b")]
    assert main(["plot", *runs, "--labels", "only-one", "--out", str(png)]) == 1
    assert _error(capsys, "plot") == "--labels: 1 label(s) for 2 run(s); give one label per run"
    assert main(["plot", *runs, "--labels", "A", "B", "--out", str(png)]) == 0
    assert png.stat().st_size > 1000


def test_stdout_holds_no_deepspeed_notice_unless_debug(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "tspo_fast.cli", "train", "--config", str(tmp_path / "missing.yaml")]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 1 and p.stdout == "", p.stdout
    assert p.stderr.strip() == f"tspo-fast train: error: config file not found: {tmp_path / 'missing.yaml'}", p.stderr
    if not torch.cuda.is_available():            # DeepSpeed's notice exists on machines without a GPU only
        p = subprocess.run(cmd + ["--debug"], capture_output=True, text=True, timeout=300, env=env)
        assert "Setting accelerator to CPU" in p.stdout


@pytest.mark.parametrize("text, message", [
    ("rollout:\n  n: 2\nrollout:\n  n: 3\n", "{cfg}:3:1: duplicate key 'rollout' (first given at line 1); YAML "
                                             "would keep only the last one"),
    ("", "{cfg}: the config file has no settings"),
    ("train: 5\n", "{cfg}: train: expected a mapping of its fields, got 5"),
])
def test_config_file_errors_through_the_command(capsys, tmp_path, text, message):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(text)
    assert main(["train", "--config", str(cfg), "--set", "train.lr=1e-3"]) == 1
    assert _error(capsys, "train").startswith(message.format(cfg=cfg))
