"""Fault injection, for real: training runs in fresh processes (``tspo-fast train``, DeepSpeed ZeRO-3
on gloo, the HF engine, the small settings of test_trainer) that are killed, interrupted, starved
of their retrieval server, handed a corrupted checkpoint or an exploding learning rate.  Each test
asserts that nothing is lost: the newest complete checkpoint survives, matches its manifest and
resumes; nothing broken is saved over something good; errors are one clear line."""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch
from _procs import free_port
from _world import world_index_dir
from test_trainer import SMALL

from tspo_fast.cli.eval import main as eval_main
from tspo_fast.config import ConfigError
from tspo_fast.training.checkpoint import CheckpointError, list_checkpoints, verify_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = SMALL + ["rollout.engine=hf", "train.eval_every=0", "train.eval_at_start=false"]


def _cmd(out, *sets, extra=()):
    args = [a for s in BASE + [f"output_dir={out}", *sets] for a in ("--set", s)]
    return [sys.executable, "-m", "tspo_fast.cli", "train", "--config", "configs/tiny.yaml", "--no-plot", *args, *extra]


def _popen(train_env, out, *sets, extra=()):
    return subprocess.Popen(_cmd(out, *sets, extra=extra), cwd=ROOT, env=train_env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _run(train_env, out, *sets, extra=(), ok=True, timeout=600):
    p = subprocess.run(_cmd(out, *sets, extra=extra), cwd=ROOT, env=train_env, capture_output=True, text=True,
                       timeout=timeout)
    if ok:
        assert p.returncode == 0, f"{p.stdout[-2000:]}\n{p.stderr[-4000:]}"
    return p


def _steps(out):
    path = os.path.join(out, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line)["step"] for line in f if line.strip()]


def _wait_for_steps(p, out, n, timeout=300):
    deadline = time.time() + timeout
    while len(_steps(out)) < n:
        assert p.poll() is None, p.communicate()[1][-3000:]
        assert time.time() < deadline, "the run made no progress"
        time.sleep(0.2)


def _latest(out):
    return open(os.path.join(out, "checkpoints", "latest")).read().strip()


def _error_line(stderr):
    """The CLI's one-line error (and no traceback)."""
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [ln for ln in stderr.splitlines() if ln.startswith("tspo-fast train: error: ")]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


def _flip_bytes(path, offset, n=16):
    with open(path, "r+b") as f:
        f.seek(offset)
        data = f.read(n)
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in data))


@pytest.mark.slow
def test_kill9_mid_checkpoint_write_then_sigint_mid_step(train_env, tmp_path):
    """kill -9 while step k's checkpoint is being written (the process is frozen inside the write,
    then killed): ``latest`` names step k-1, which is complete and valid; the half-written folder is
    never read.  ``--resume`` continues from k-1; a SIGINT in the middle of a later step finishes
    that step, saves it and exits 0; the save removed the debris."""
    out = str(tmp_path / "run")
    root = os.path.join(out, "checkpoints")
    sets = ["train.total_steps=40", "train.checkpoint_every=1", "train.keep_checkpoints=3"]
    p = _popen(train_env, out, *sets)
    deadline = time.time() + 300
    caught = None
    while caught is None:
        assert p.poll() is None and time.time() < deadline, p.communicate()[1][-3000:]
        tmps = [d for d in os.listdir(root) if d.startswith(".tmp-step_")] if os.path.isdir(root) else []
        if tmps and int(tmps[0].rsplit("_", 1)[1]) >= 2:
            os.kill(p.pid, signal.SIGSTOP)                     # frozen mid-write (if the folder is still there)
            if os.path.isdir(os.path.join(root, tmps[0])):
                caught = tmps[0]
            else:
                os.kill(p.pid, signal.SIGCONT)
        time.sleep(0.002)
    os.kill(p.pid, signal.SIGKILL)
    p.communicate(timeout=60)
    killed = int(caught.rsplit("_", 1)[1])
    assert os.path.isdir(os.path.join(root, caught))           # the interrupted write is there ...
    assert _latest(out) == f"step_{killed - 1:06d}"            # ... and is not what `latest` names
    verify_checkpoint(os.path.join(root, _latest(out)))        # the previous one is complete
    assert [s for s, _ in list_checkpoints(root)][-1] == killed - 1

    p = _popen(train_env, out, "train.total_steps=40", "train.checkpoint_every=0", extra=["--resume"])
    _wait_for_steps(p, out, killed + 1)                        # steps k and k+1 redone/done: k+2 is running
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    assert f"continuing from {os.path.join(root, f'step_{killed - 1:06d}')}" in err
    steps = _steps(out)
    assert steps == list(range(1, steps[-1] + 1)) and steps[-1] > killed    # metrics continue where the state does
    assert _latest(out) == f"step_{steps[-1]:06d}"             # the step in progress was finished and saved
    verify_checkpoint(os.path.join(root, _latest(out)))
    assert "SIGINT" in err and "continue with --resume" in err
    assert not [d for d in os.listdir(root) if d.startswith(".")]   # no debris left


def _serve(index, port, env):
    proc = subprocess.Popen([sys.executable, "-m", "tspo_fast.cli", "retriever", "serve", "--index", str(index),
                             "--port", str(port), "--log-level", "warning"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        assert proc.poll() is None and time.time() < deadline, "the retrieval server did not start"
        time.sleep(0.1)


@pytest.mark.slow
def test_retrieval_server_killed_then_restarted_and_resumed(train_env, tmp_path, tmp_path_factory):
    """The server dies mid-run: the RetrievalError (after the retries) ends the run with one line,
    after a checkpoint of the last completed step; with the server back, ``--resume`` goes on."""
    index = world_index_dir(tmp_path_factory, "bm25")
    port = free_port()
    http = ["retrieval.kind=http", f"retrieval.url=http://127.0.0.1:{port}", "retrieval.retries=1",
            "retrieval.timeout_s=5", "retrieval.backoff_s=0.1", "train.checkpoint_every=0", "train.total_steps=40"]
    out = str(tmp_path / "run")
    server = _serve(index, port, train_env)
    try:
        p = _popen(train_env, out, *http)
        _wait_for_steps(p, out, 1)
        server.kill()
        server.wait(30)
        _, err = p.communicate(timeout=300)
        assert p.returncode == 1, err[-3000:]
        line = _error_line(err)
        assert "retrieval failed at turn" in line and "after 2 attempt(s)" in line, line
        steps = _steps(out)
        assert steps and _latest(out) == f"step_{steps[-1]:06d}"     # nothing completed was lost
        verify_checkpoint(os.path.join(out, "checkpoints", _latest(out)))
        assert "before stopping; continue with --resume" in err

        server = _serve(index, port, train_env)
        _run(train_env, out, *http, extra=["--resume", "--max-steps", "1"])
        assert _steps(out) == list(range(1, steps[-1] + 2))
        assert _latest(out) == f"step_{steps[-1] + 1:06d}"
    finally:
        server.kill()
        server.wait(30)


def _tree(folder):
    return sorted((os.path.relpath(os.path.join(d, n), folder), os.path.getmtime(os.path.join(d, n)))
                  for d, _, names in os.walk(folder) for n in names)


@pytest.mark.slow
def test_corrupted_latest_checkpoint_is_named_and_the_older_one_taken(train_env, tmp_path):
    out = str(tmp_path / "run")
    root = os.path.join(out, "checkpoints")
    common = ["train.checkpoint_every=1", "train.keep_checkpoints=3"]
    _run(train_env, out, "train.total_steps=2", *common)
    bad = os.path.join(root, "step_000002", "ds", "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    _flip_bytes(bad, os.path.getsize(bad) // 2)                   # same size, other bytes

    r = _run(train_env, out, "train.total_steps=3", *common, extra=["--resume"], ok=False)
    assert r.returncode == 1
    line = _error_line(r.stderr)
    assert bad in line and "checksum" in line and "step_000001" in line and "--resume auto" in line, line

    r = _run(train_env, out, "train.total_steps=3", "train.lr=1e-3", *common, extra=["--resume", "auto"])
    assert f"skipping {os.path.join(root, 'step_000002')}" in r.stderr
    assert "train.lr: 0.0003 -> 0.001 (applied" in r.stderr          # a changed lr is applied, and said so
    assert [s for s, _ in list_checkpoints(root)] == [1, 2, 3] and _latest(out) == "step_000003"
    for _, folder in list_checkpoints(root):                          # step 2 was re-written over the bad copy
        verify_checkpoint(folder)
    assert _steps(out) == [1, 2, 3]

    truncated = os.path.join(root, "step_000001", "rng_rank0.pt")
    with open(truncated, "r+b") as f:
        f.truncate(100)
    with pytest.raises(CheckpointError, match=r"rng_rank0\.pt has 100 bytes, the manifest says"):
        verify_checkpoint(os.path.join(root, "step_000001"))

    # eval reads the run's checkpoints and writes nothing into the run's folder
    snapshot = _tree(out)

    def evaluate(result):
        return subprocess.run([sys.executable, "-m", "tspo_fast.cli", "eval", "--config", "configs/tiny.yaml",
                               "--checkpoint", root, "--limit", "1", "--out", result,
                               *[a for s in BASE + [f"output_dir={out}"] for a in ("--set", s)]],
                              cwd=ROOT, env=train_env, capture_output=True, text=True, timeout=600)
    p = evaluate(str(tmp_path / "eval.json"))
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.load(open(tmp_path / "eval.json"))["overall"]["n"] == 1 and _tree(out) == snapshot
    with pytest.raises(ConfigError, match="eval never writes into a training run's folder"):
        eval_main(["--config", os.path.join(ROOT, "configs", "tiny.yaml"), "--checkpoint", root, "--out", os.path.join(out, "eval.json"),
                   "--set", f"output_dir={out}"])
    assert _tree(out) == snapshot


@pytest.fixture(scope="module")
def good_run(train_env, tmp_path_factory):
    """A healthy 3-step run, a checkpoint every step, the newest one kept: the tests below resume copies of it."""
    out = str(tmp_path_factory.mktemp("good") / "run")
    _run(train_env, out, "train.total_steps=3", "train.checkpoint_every=1", "train.keep_checkpoints=1")
    assert [s for s, _ in list_checkpoints(os.path.join(out, "checkpoints"))] == [3]
    return out


def _copy(run, tmp_path):
    out = str(tmp_path / "run")
    shutil.copytree(run, out)
    return out


def _rows(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_an_update_that_wrecks_the_weights_is_not_saved_and_the_last_good_checkpoint_stays(train_env, good_run,
                                                                                          tmp_path):
    """The issue's case: resuming a good run with train.lr=1e6, keep_checkpoints=1, checkpoint_every=1.
    The first update wrecks the weights (finite, but the policy jumps by nats per token); the guard
    judges the update's result before saving: step 4 is not saved, and step 3 is kept byte for byte."""
    out = _copy(good_run, tmp_path)
    step3 = os.path.join(out, "checkpoints", "step_000003")
    manifest = open(os.path.join(step3, "manifest.json")).read()
    r = _run(train_env, out, "train.lr=1e6", "train.total_steps=20", "train.checkpoint_every=1",
             "train.keep_checkpoints=1", extra=["--resume"], ok=False)
    assert r.returncode == 1
    line = _error_line(r.stderr)
    assert line.startswith("tspo-fast train: error: training diverged at step 4: the update moved the policy by KL "), line
    assert "nats per token on the step's own batch (train/update_kl; train.max_update_kl is 1)" in line, line
    assert "the last healthy step was 3" in line and "train.lr=1e+06" in line and f"newest checkpoint is {step3}" in line
    assert [s for s, _ in list_checkpoints(os.path.join(out, "checkpoints"))] == [3] and _latest(out) == "step_000003"
    assert open(os.path.join(step3, "manifest.json")).read() == manifest       # untouched ...
    verify_checkpoint(step3)                                                   # ... and complete
    last = _rows(out)[-1]
    assert last["step"] == 4 and last["train/update_kl"] > 1 and last["train/param_norm"] > 10 * _rows(out)[-2][
        "train/param_norm"]


def test_nan_weights_from_an_unverified_corrupted_checkpoint_are_caught_before_saving(train_env, good_run, tmp_path):
    """The issue's second case: the checkpoint has no manifest.json (loaded unverified) and a corrupted
    optimizer state (a negative second moment: its update is NaN).  The first update leaves 16,384 NaN
    weights; the guard names them, nothing is saved, the loaded checkpoint stays."""
    out = _copy(good_run, tmp_path)
    step3 = os.path.join(out, "checkpoints", "step_000003")
    os.remove(os.path.join(step3, "manifest.json"))
    optim = os.path.join(step3, "ds", "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    state = torch.load(optim, weights_only=False, map_location="cpu")
    state["optimizer_state_dict"]["optimizer_state_dict"]["state"][0]["exp_avg_sq"][:16384] = -1.0
    torch.save(state, optim)
    r = _run(train_env, out, "train.total_steps=20", "train.checkpoint_every=1", "train.keep_checkpoints=1",
             extra=["--resume"], ok=False)
    assert r.returncode == 1
    assert "has no manifest.json" in r.stderr and "loading it unverified" in r.stderr
    line = _error_line(r.stderr)
    assert "training diverged at step 4: the update left non-finite weights: lm." in line, line
    counts = [int(n.replace(",", "")) for n in re.findall(r"\(([\d,]+) NaN/inf value\(s\)\)", line)]
    assert counts and sum(counts) <= 16384 and f"newest checkpoint is {step3}" in line, line
    assert [s for s, _ in list_checkpoints(os.path.join(out, "checkpoints"))] == [3] and _latest(out) == "step_000003"


class _Lines:
    """The stderr lines of a running process, read on a thread (so the test can wait for one)."""

    def __init__(self, p):
        self.lines, self._p = [], p
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self):
        for line in self._p.stderr:
            self.lines.append(line)

    def wait_for(self, text, timeout=120):
        """Until a line holds ``text`` (or the process ended)."""
        deadline = time.time() + timeout
        while not any(text in line for line in self.lines) and self._p.poll() is None:
            assert time.time() < deadline, "".join(self.lines)[-3000:]
            time.sleep(0.01)

    def text(self):
        self._thread.join(60)
        return "".join(self.lines)


@pytest.mark.slow
def test_one_run_per_output_dir_a_stale_lock_and_ctrl_c_during_the_final_save(train_env, good_run, tmp_path):
    """A second run into a folder in use is refused, naming the folder and the run; once that run is
    killed (-9), the next one takes its lock over with a warning.  That next run resumes an unverified
    checkpoint (no manifest.json), which its pruning keeps; Ctrl-C twice during its final save: the save
    finishes, `latest` names it, nothing half-written is left."""
    out = _copy(good_run, tmp_path)
    root = os.path.join(out, "checkpoints")
    first = _popen(train_env, out, "train.total_steps=40", "train.checkpoint_every=0", extra=["--resume"])
    try:
        _wait_for_steps(first, out, 4)                       # training: the folder is locked
        owner = json.load(open(os.path.join(out, "run.lock")))
        assert owner["pid"] == first.pid and owner["host"] == socket.gethostname()
        r = _run(train_env, out, "train.total_steps=40", extra=["--resume"], ok=False)
        assert r.returncode == 1
        line = _error_line(r.stderr)
        assert line.startswith(f"tspo-fast train: error: output_dir {out} is in use by another run (pid {first.pid} "
                               f"on host {owner['host']}, started "), line
        assert "one run per output_dir" in line
    finally:
        first.kill()
        first.communicate(timeout=60)
    assert os.path.exists(os.path.join(out, "run.lock"))       # left behind by kill -9
    assert [s for s, _ in list_checkpoints(root)] == [3]      # the killed run saved nothing (checkpoint_every 0)

    os.remove(os.path.join(root, "step_000003", "manifest.json"))
    p = _popen(train_env, out, "train.total_steps=40", "train.checkpoint_every=0", "train.keep_checkpoints=1",
               extra=["--resume", "--max-steps", "2"])
    err = _Lines(p)
    tmp = os.path.join(root, ".tmp-step_000005")
    deadline = time.time() + 300
    while not os.path.isdir(tmp):                              # the final save has begun
        assert p.poll() is None and time.time() < deadline, err.text()[-3000:]
        time.sleep(0.002)
    os.kill(p.pid, signal.SIGSTOP)
    assert os.path.isdir(tmp)
    os.kill(p.pid, signal.SIGINT)
    os.kill(p.pid, signal.SIGCONT)
    err.wait_for("a checkpoint is being written; it finishes first")
    os.kill(p.pid, signal.SIGSTOP)
    second_during_save = os.path.isdir(tmp)
    os.kill(p.pid, signal.SIGINT)                             # Ctrl-C again
    os.kill(p.pid, signal.SIGCONT)
    p.wait(timeout=300)
    stderr = err.text()
    assert second_during_save, "the save ended before the second Ctrl-C: nothing was tested"
    assert p.returncode == 0, stderr[-3000:]
    assert f"warning: output_dir {out}: taking over the lock of a run that is gone (pid {first.pid} " in stderr
    assert stderr.count("a checkpoint is being written; it finishes first, then the run stops") == 2
    assert _latest(out) == "step_000005"
    verify_checkpoint(os.path.join(root, "step_000005"))
    # keep_checkpoints 1, yet the unverified checkpoint the run loaded is kept beside the newest
    assert [s for s, _ in list_checkpoints(root)] == [3, 5]
    assert not [d for d in os.listdir(root) if d.startswith(".")] and not os.path.exists(os.path.join(out, "run.lock"))


def test_resuming_a_finished_run_says_so_and_eval_names_the_model_it_trained(train_env, good_run, tmp_path):
    out = _copy(good_run, tmp_path)
    r = _run(train_env, out, "train.total_steps=3", "train.checkpoint_every=1", "train.keep_checkpoints=1",
             extra=["--resume"])
    assert ("the run is already finished: it is at step 3 and train.total_steps is 3; nothing to train (to go on, "
            "raise train.total_steps above 3)") in r.stderr
    assert _steps(out) == [1, 2, 3] and _latest(out) == "step_000003"
    with pytest.raises(ConfigError, match=r"its run trained model.path 'bundled:warmstart', the config gives "
                                          r"'bundled:tiny'; evaluate it with --set model.path=bundled:warmstart"):
        eval_main(["--config", os.path.join(ROOT, "configs", "tiny.yaml"), "--checkpoint",
                   os.path.join(out, "checkpoints"), "--out", str(tmp_path / "eval.json"),
                   "--set", "model.path=bundled:tiny"])


def test_pruning_keeps_the_newest_healthy_checkpoint_and_those_protected(tmp_path):
    from tspo_fast.training.checkpoint import _prune

    root = tmp_path / "checkpoints"
    for step, healthy in ((1, True), (2, True), (3, True), (4, False), (5, False)):
        folder = root / f"step_{step:06d}"
        folder.mkdir(parents=True)
        (folder / "trainer.json").write_text(json.dumps({"step": step, "healthy": healthy}))
    (root / "latest").write_text("step_000005")
    _prune(str(root), keep=1, protect=[str(root / "step_000001")])
    # the newest (and `latest`), the newest healthy one, and the protected one (a checkpoint loaded unverified)
    assert [s for s, _ in list_checkpoints(str(root))] == [1, 3, 5]


def test_a_staged_folder_replaces_its_destination_whole_or_not_at_all(tmp_path):
    """Exports and warm-start builds write into a folder beside the destination, renamed over it
    once complete: a failure midway leaves the old folder as it was, and no temporary folder."""
    from tspo_fast.training.checkpoint import staged_folder

    final = tmp_path / "export"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="disk full"):
        with staged_folder(str(final) + "/") as tmp:
            assert os.path.dirname(tmp) == str(tmp_path) and os.path.isdir(tmp) and not os.listdir(tmp)
            open(os.path.join(tmp, "new.txt"), "w").write("half")
            raise RuntimeError("disk full")
    assert sorted(os.listdir(tmp_path)) == ["export"] and os.listdir(final) == ["old.txt"]
    with staged_folder(str(final)) as tmp:
        open(os.path.join(tmp, "new.txt"), "w").write("new")
        assert os.listdir(final) == ["old.txt"]                # the old one stays readable until the end
    assert sorted(os.listdir(tmp_path)) == ["export"] and os.listdir(final) == ["new.txt"]
    with staged_folder(str(tmp_path / "a" / "b")) as tmp:      # missing parent folders are made
        open(os.path.join(tmp, "x"), "w").write("x")
    assert os.listdir(tmp_path / "a" / "b") == ["x"]
