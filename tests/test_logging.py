"""Logging backends (``logging`` config section, ``tspo_fast.training.metrics.MetricsLogger``):
metrics.jsonl, TensorBoard and wandb (offline: ``WANDB_MODE=offline``, the run files read back
with wandb's own record protobuf), and Search-R1's metric names in ``step_metrics``."""
import glob
import json
import os
import re
import subprocess
import sys
import time

import pytest
import torch

from tspo_fast.config import ConfigError, load_config
from tspo_fast.env.batch import Trajectory, collate
from tspo_fast.training.metrics import MetricsLogger, phase, read_metrics, search_r1_metrics, step_metrics
from tspo_fast.training.plots import PANELS, plot_runs
from tspo_fast.training.ppo import UpdateStats
from tspo_fast.training.report import run_report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- config
def test_logging_config_defaults_and_errors():
    cfg = load_config(None, ["logging.backends=[jsonl,wandb]", "logging.tags=[tiny,ci]", "logging.run_name=r1"])
    assert cfg.logging.backends == ["jsonl", "wandb"] and cfg.logging.tags == ["tiny", "ci"]
    assert cfg.logging.run_name == "r1" and cfg.logging.project == "tspo-fast"
    assert load_config(None).logging.backends == ["jsonl", "tensorboard"]
    assert load_config(None, ["logging.backends=wandb"]).logging.backends == ["wandb"]
    with pytest.raises(ConfigError, match=r"logging.backends\[1\]: must be one of 'jsonl', 'tensorboard', 'wandb'"):
        load_config(None, ["logging.backends=[jsonl,mlflow]"])
    with pytest.raises(ConfigError, match="logging.backends: names a backend twice"):
        load_config(None, ["logging.backends=[jsonl,jsonl]"])
    with pytest.raises(ConfigError, match="logging.project: must name a wandb project"):
        load_config(None, ["logging.project= "])
    with pytest.raises(ConfigError, match="logging.colour: unknown field"):
        load_config(None, ["logging.colour=red"])


# ----------------------------------------------------------------------------- jsonl + tensorboard
def test_jsonl_and_tensorboard(tmp_path):
    out = str(tmp_path / "run")
    log = MetricsLogger(out, backends=("jsonl", "tensorboard"))
    for step in (1, 2, 3):
        log.log(step, {"reward/mean": step / 10, "n": 4})
    png = plot_runs([out], os.path.join(out, "curves.png"))
    log.log_image("curves", png, step=3)
    log.close()
    assert [r["step"] for r in read_metrics(os.path.join(out, "metrics.jsonl"))] == [1, 2, 3]
    events = glob.glob(os.path.join(out, "tensorboard", "events.out.tfevents.*"))
    assert events and os.path.getsize(events[0]) > 1000          # scalars and the PNG
    resumed = MetricsLogger(out, backends=("jsonl",), resume_step=2)
    resumed.close()
    assert [r["step"] for r in read_metrics(os.path.join(out, "metrics.jsonl"))] == [1, 2]
    only_tb = MetricsLogger(str(tmp_path / "tb"), backends=("tensorboard",))
    only_tb.log(1, {"x": 1.0})
    only_tb.close()
    assert not os.path.exists(tmp_path / "tb" / "metrics.jsonl")
    with pytest.raises(ValueError, match="unknown backend"):
        MetricsLogger(out, backends=("mlflow",))


# ----------------------------------------------------------------------------- wandb, offline
def read_wandb_run(run_file):
    """The records of an offline wandb run file (``run-<id>.wandb``), as wandb's own
    ``wandb_internal_pb2.Record`` protobufs.  The file is a LevelDB-style log: a 7-byte header
    (``:W&B``, magic 0xBEE1, version 0), then 32 KiB blocks of chunks (crc32c 4 bytes, length 2
    bytes little-endian, type 1 byte: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2 as pb
    data = open(run_file, "rb").read()
    assert data[:4] == b":W&B", f"{run_file}: not a wandb run file"
    records, pos, part, block = [], 7, b"", 32768
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:                                   # block trailer
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        if kind == 0:                                  # zero padding at the end of a block
            pos += left
            continue
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 1:
            records.append(chunk)
        elif kind == 2:
            part = chunk
        elif kind == 3:
            part += chunk
        elif kind == 4:
            records.append(part + chunk)
    return [pb.Record.FromString(r) for r in records]


def wandb_history(records):
    """{step: {key: value}} of the history records (values JSON-decoded, nested keys as dicts)."""
    out = {}
    for r in records:
        if r.WhichOneof("record_type") != "history":
            continue
        row: dict = {}
        for i in r.history.item:
            *path, last = [i.key] if i.key else list(i.nested_key)    # an image: ["curves", "_type"], ...
            node = row
            for k in path:
                node = node.setdefault(k, {})
            node[last] = json.loads(i.value_json)
        out.setdefault(int(row.get("_step", r.history.step.num)), {}).update(row)
    return out


def wandb_config(records):
    """The run config of the records (in the run record, and in later config records)."""
    out = {}
    for r in records:
        kind = r.WhichOneof("record_type")
        items = r.run.config.update if kind == "run" else r.config.update if kind == "config" else []
        for i in items:
            key = i.key or "/".join(i.nested_key)
            if not key.startswith("_"):
                out[key] = json.loads(i.value_json)
    return out


def offline_runs(out):
    return sorted(glob.glob(os.path.join(out, "wandb", "offline-run-*")))


def finished_run_records(run_dir, timeout_s=30.0):
    """The records of the run in ``run_dir`` once its file holds the final ``exit`` record (wandb's
    service process writes the file; under load it can land just after ``finish()`` returns)."""
    deadline = time.monotonic() + timeout_s
    while True:
        files = glob.glob(os.path.join(run_dir, "run-*.wandb"))
        records = read_wandb_run(files[0]) if len(files) == 1 and os.path.getsize(files[0]) >= 7 else []
        kinds = [r.WhichOneof("record_type") for r in records]
        if "exit" in kinds or time.monotonic() > deadline:
            assert "exit" in kinds, f"{run_dir}: the run file has no exit record ({len(files)} files, records {kinds})"
            return records
        time.sleep(0.2)


def test_wandb_offline_run_holds_the_config_metrics_and_curves(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is not installed (pip install 'tspo-fast[wandb]')")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = str(tmp_path / "run")
    cfg = load_config(None, [f"output_dir={out}", "logging.backends=[jsonl,wandb]", "logging.project=tspo-test",
                             "logging.run_name=offline-check", "logging.tags=[tiny,ci]", "rollout.n=3"])
    log = MetricsLogger.from_config(cfg)
    assert log.wandb_run is not None
    for step in (1, 2, 3):
        log.log(step, {"reward/mean": step / 10, "env/finish_ratio": 1.0 - step / 10, "note": "text, not a scalar"})
    png = plot_runs([out], os.path.join(out, "curves.png"))
    log.log_image("curves", png, step=3)
    log.close()

    (run_dir,) = offline_runs(out)
    records = finished_run_records(run_dir)
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert (run.project, run.display_name, list(run.tags)) == ("tspo-test", "offline-check", ["tiny", "ci"])
    config = wandb_config(records)
    assert config["rollout"]["n"] == 3 and config["logging"]["backends"] == ["jsonl", "wandb"]
    history = wandb_history(records)
    assert sorted(history) == [1, 2, 3]
    for step in (1, 2, 3):
        assert history[step]["reward/mean"] == pytest.approx(step / 10)
        assert history[step]["env/finish_ratio"] == pytest.approx(1.0 - step / 10)
        assert "note" not in history[step]
    image = history[3]["curves"]
    assert image["_type"] == "image-file" and image["format"] == "png"
    assert os.path.getsize(os.path.join(run_dir, "files", image["path"])) > 1000
    assert os.path.exists(os.path.join(out, "metrics.jsonl"))

    # resume: the same wandb run (its id is kept in the output folder)
    run_id = open(os.path.join(out, "wandb_run_id")).read().strip()
    again = MetricsLogger.from_config(cfg, resume_step=3)
    assert again.wandb_run.id == run_id
    again.log(4, {"reward/mean": 0.4})
    again.close()
    assert len(offline_runs(out)) == 2 and all(r.endswith(run_id) for r in offline_runs(out))


def test_missing_wandb_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)            # what `import wandb` sees where it is not installed
    with pytest.raises(ImportError, match=r"logging.backends includes 'wandb'.*pip install 'tspo-fast\[wandb\]'"):
        MetricsLogger(str(tmp_path / "run"), backends=("jsonl", "wandb"))
    MetricsLogger(str(tmp_path / "run"), backends=("jsonl",)).close()       # the others do not need it


# ----------------------------------------------------------------------------- Search-R1's metric names
def _trajectory(actions, answer, uid):
    t = Trajectory(prompt_ids=[1, 2, 3], uid=uid)
    for turn, (text, obs) in enumerate(actions):
        t.append([10 + turn] * 2, turn, obs=False, logps=[-0.5, -0.5])
        t.action_texts.append(text)
        t.observation_texts.append("")
        if obs:
            t.append([30] * 4, turn, obs=True)
        t.num_turns = turn + 1
    t.answer_text = answer
    return t


# per row: (action text, observation appended?); row 1 searches in its last turn (Search-R1 counts
# that search as valid although it is not run) and never answers
ROWS = [[("<search> capital of France </search>", True), ("<answer> Paris </answer>", False)],
        [("I am not sure.", True), ("<search> x </search>", True), ("<search> y </search>", False)],
        [("<think> easy </think><answer> Rome </answer>", False)]]
ANSWERS = ["Paris", None, "Rome"]


def test_search_r1_metric_names_and_values():
    batch = collate([_trajectory(r, a, f"q{i}") for i, (r, a) in enumerate(zip(ROWS, ANSWERS))], pad_id=0)
    outcome = torch.tensor([1.0, 0.0, 0.0])
    token_adv = torch.where(batch.loss_mask, torch.tensor([[1.0], [-0.5], [-0.5]]), torch.zeros(()))
    # Search-R1's compute_data_metrics on its generation loop's per-trajectory counters
    turns_stats, active = [2, 3, 1], [False, True, False]
    valid_action, valid_search = [2, 2, 1], [1, 2, 0]
    want = {"env/number_of_actions/mean": 2.0, "env/number_of_actions/max": 3.0, "env/number_of_actions/min": 1.0,
            "env/finish_ratio": 1 - sum(active) / 3, "env/number_of_valid_action": sum(valid_action) / 3,
            "env/ratio_of_valid_action": sum(v / t for v, t in zip(valid_action, turns_stats)) / 3,
            "env/number_of_valid_search": sum(valid_search) / 3,
            "critic/score/mean": 1 / 3, "critic/score/max": 1.0, "critic/score/min": 0.0,
            "critic/advantages/max": 1.0, "critic/advantages/min": -0.5,
            "response_length/mean": (8 + 14 + 2) / 3, "response_length/max": 14.0, "response_length/min": 2.0,
            "prompt_length/mean": 3.0}
    got = search_r1_metrics(batch, outcome, token_adv)
    for k, v in want.items():
        assert got[k] == pytest.approx(v), k
    m = step_metrics(batch, outcome, torch.tensor([0, -1, -1]), token_adv, torch.zeros(3, 3), UpdateStats(),
                     {"time/step": 1.0})
    assert {k: m[k] for k in want} == pytest.approx(want)
    assert m["rollout/searches"] == 0.0             # no search ran in this hand-made batch (num_searches = 0)


def test_curves_panels_are_distinct_metrics_the_trainer_logs():
    """curves.png draws each of its panels from a different metric, each one the trainer logs
    (``reward/em`` would repeat ``reward/mean`` under ``reward.outcome: em``)."""
    keys = [k for k, _ in PANELS]
    assert len(set(keys)) == len(keys) and len({t for _, t in PANELS}) == len(PANELS)
    batch = collate([_trajectory(r, a, f"q{i}") for i, (r, a) in enumerate(zip(ROWS, ANSWERS))], pad_id=0)
    logged = step_metrics(batch, torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0, -1, -1]),
                          torch.zeros(batch.input_ids.shape), torch.zeros(3, 3), UpdateStats(), {"time/step": 1.0},
                          outcome_kind="em")
    assert "reward/em" not in keys and logged["reward/em"] == logged["reward/mean"]
    assert all(k in logged for k in keys if not k.startswith("eval/"))


def test_phase_records_each_timed_block_under_its_metric_name():
    times = {}
    with phase(times, "time/step"):
        with phase(times, "time/sync"):
            time.sleep(0.001)
        with phase(times, "time/sync"):             # a phase run twice in a step: the seconds add up
            pass
    assert list(times) == ["time/sync", "time/step"]
    assert 0 < times["time/sync"] <= times["time/step"]
    with pytest.raises(ValueError):
        with phase(times, "time/update"):
            raise ValueError("boom")
    assert "time/update" not in times               # a failed phase is not reported as a duration


EVAL_KEYS = ("em", "turns", "searches", "answer_retrieved", "n")      # evaluate()'s "overall", as the trainer logs it


def _logged_run(out_dir, resume_step=None):
    """A run's metrics logged as the trainer logs them: the initial evaluation as step 0, then steps
    whose rows are step_metrics of a real batch (and an evaluation at step 3)."""
    batch = collate([_trajectory(r, a, f"q{i}") for i, (r, a) in enumerate(zip(ROWS, ANSWERS))], pad_id=0)
    logger = MetricsLogger(out_dir, backends=("jsonl",), resume_step=resume_step)
    if resume_step is None:
        logger.log(0, {f"eval/{k}": v for k, v in zip(EVAL_KEYS, (0.25, 1.0, 0.0, 0.5, 4))})
    for step, outcome in ((1, [0.0, 0.0, 0.0]), (2, [1.0, 0.0, 0.0]), (3, [1.0, 1.0, 0.0])):
        if resume_step is not None and step <= resume_step:
            continue
        times = {"time/rollout": 2.0 * step, "time/reward_advantage": 0.1, "time/logprobs": 0.5, "time/update": 1.0,
                 "time/health": 0.1, "time/sync": 0.25, "time/step": 2.0 * step + 2.0}
        m = step_metrics(batch, torch.tensor(outcome), torch.tensor([0, -1, -1]), torch.zeros(batch.input_ids.shape),
                         torch.zeros(3, 3), UpdateStats(), times, outcome_kind="em")
        if step == 3:
            m.update({f"eval/{k}": v for k, v in zip(EVAL_KEYS, (0.75, 2.0, 1.0, 1.0, 4))})
        logger.log(step, m)
    logger.close()
    return logger


def test_run_report_reads_the_runs_rows(tmp_path):
    out = str(tmp_path / "run")
    logger = _logged_run(out)
    rows = read_metrics(logger.path)
    assert logger.rows == rows                         # what the report reads is metrics.jsonl, whatever the backends
    ckpt = os.path.join(out, "checkpoints", "step_000003")
    text = run_report(rows, output_dir=out, total_steps=10, wall_seconds=125.0, checkpoint=ckpt,
                      metrics_file=logger.path, curves=os.path.join(out, "curves.png"))
    lines = text.splitlines()
    assert lines[0] == "run summary" and len(lines) == 12, text
    table = {line[:24].strip(): line[24:] for line in lines[1:]}
    assert table == {
        "steps": "3 of 10 (train.total_steps)",
        "train reward": "0.000 (step 1) -> 0.667 (step 3)",
        "greedy test EM": "0.250 (step 0) -> 0.750 (step 3) on 4 test questions",
        "searches per rollout": "0.00 (step 1) -> 0.00 (step 3)",          # (the hand-made batch ran no search)
        "valid actions": f"{100 * rows[1]['env/ratio_of_valid_action']:.0f}% (step 1) -> "
                         f"{100 * rows[-1]['env/ratio_of_valid_action']:.0f}% (step 3)",
        "mean time per phase": "rollout 4.00 s, log-probs 0.50 s, update 1.00 s, sync 0.25 s, step 6.00 s (over 3 steps)",
        "wall time": "2 min 05 s",
        "output_dir": out,
        "latest checkpoint": ckpt,
        "metrics": logger.path,
        "curves": os.path.join(out, "curves.png"),
    }, text
    # a resumed run: the rows kept from before the checkpoint count, and the report says where it resumed
    resumed = _logged_run(out, resume_step=2)
    assert [r["step"] for r in resumed.rows] == [0, 1, 2, 3] and resumed.rows == read_metrics(logger.path)
    text = run_report(resumed.rows, output_dir=out, total_steps=3, first_step=2)
    assert "  steps                 3 of 3 (train.total_steps); this run: 1, resumed at step 2" in text.splitlines()
    # nothing evaluated, no step run, no checkpoint
    text = run_report([], output_dir=out, metrics_file=None)
    for line in ("steps                 0", "train reward          not logged", "latest checkpoint     none written",
                 "greedy test EM        not evaluated (train.eval_every: 0, or no test questions)",
                 "metrics               no metrics.jsonl (logging.backends has no jsonl)"):
        assert f"  {line}" in text.splitlines(), text


# ----------------------------------------------------------------------------- the trainer and `tspo-fast train`
def test_train_command_logs_to_wandb_offline(train_env, tmp_path):
    """`python -m tspo_fast.train` (the trainer building its logger from the config) with
    logging.backends [jsonl, tensorboard, wandb], offline: the step metrics (ours and
    Search-R1's names), the run config and the curves PNG are in the wandb run."""
    pytest.importorskip("wandb", reason="wandb is not installed (pip install 'tspo-fast[wandb]')")
    out = str(tmp_path / "run")
    sets = ["rollout.n=2", "train.prompts_per_step=2", "train.mini_batch_prompts=2", "rollout.max_new_tokens_per_turn=24",
            "rollout.max_turns=2", "rollout.max_response_tokens=160", "train.total_steps=2", "train.eval_every=0",
            "train.checkpoint_every=0", "rollout.engine=hf", "loss.chunk_size=64", f"output_dir={out}",
            "logging.backends=[jsonl,tensorboard,wandb]", "logging.tags=[ci]"]
    env = dict(train_env, WANDB_MODE="offline", WANDB_SILENT="true")
    p = subprocess.run([sys.executable, "-m", "tspo_fast.train", "--config", "configs/tiny.yaml",
                        *[a for s in sets for a in ("--set", s)]], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=900)
    assert p.returncode == 0, p.stderr[-6000:]
    (run_dir,) = offline_runs(out)
    records = finished_run_records(run_dir)
    history = wandb_history(records)
    rows = {r["step"]: r for r in read_metrics(os.path.join(out, "metrics.jsonl"))}
    assert sorted(history) == sorted(rows) == [1, 2]
    for step, row in rows.items():
        for key in ("reward/mean", "rollout/turns", "env/number_of_actions/mean", "env/finish_ratio",
                    "env/number_of_valid_search", "env/ratio_of_valid_action", "critic/score/mean"):
            assert history[step][key] == pytest.approx(row[key]), (step, key)
    assert history[2]["curves"]["_type"] == "image-file"
    config = wandb_config(records)
    assert config["output_dir"] == out and config["rollout"]["n"] == 2
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert run.display_name == "run" and list(run.tags) == ["ci"]


def test_docs_logging_section_loads(tmp_path):
    """The `logging` YAML block of docs/training.md (section "Logging"), as written, is a valid config."""
    text = open(os.path.join(ROOT, "docs", "training.md"), encoding="utf-8").read()
    block = re.compile(r"```yaml\n(.*?)```", re.S).search(text, text.index("Logging goes to the backends"))
    assert block is not None and block.group(1).startswith("logging:")
    path = tmp_path / "logging.yaml"
    path.write_text(block.group(1), encoding="utf-8")
    cfg = load_config(str(path))
    assert cfg.logging.backends == ["jsonl", "tensorboard", "wandb"] and cfg.logging.tags == ["tiny", "tspo"]
    assert cfg.logging.run_name == "tiny-tspo"
