"""Fault injection, for real: training runs in fresh processes (``tspo-fast train``, DeepSpeed ZeRO-3
on gloo, the HF engine, the small settings of test_trainer) that are killed, interrupted, starved
of their retrieval server, handed a corrupted checkpoint or an exploding learning rate.  Each test
asserts that nothing is lost: the newest complete checkpoint survives, matches its manifest and
resumes; nothing broken is saved over something good; errors are one clear line."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
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


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def test_retrieval_server_killed_then_restarted_and_resumed(train_env, tmp_path, tmp_path_factory):
    """The server dies mid-run: the RetrievalError (after the retries) ends the run with one line,
    after a checkpoint of the last completed step; with the server back, ``--resume`` goes on."""
    index = world_index_dir(tmp_path_factory, "bm25")
    port = _free_port()
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


def test_exploding_lr_stops_the_run_and_keeps_the_healthy_checkpoint(train_env, tmp_path):
    out = str(tmp_path / "run")
    r = _run(train_env, out, "train.lr=1e6", "train.total_steps=20", "train.checkpoint_every=1",
             "train.keep_checkpoints=1", ok=False)
    assert r.returncode == 1
    line = _error_line(r.stderr)
    assert "training diverged at step" in line and "train.lr=1e+06" in line, line
    stopped = int(line.split("training diverged at step ")[1].split(":")[0])
    assert stopped < 20
    # the divergence was not saved, and pruning (keep 1) did not delete the last healthy checkpoint
    found = list_checkpoints(os.path.join(out, "checkpoints"))
    assert [s for s, _ in found] == [1] and _latest(out) == "step_000001"
    verify_checkpoint(found[0][1])
    assert json.load(open(os.path.join(found[0][1], "trainer.json")))["healthy"] is True
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert rows[-1]["step"] == stopped and rows[-1]["train/grad_norm"] == float("inf")
