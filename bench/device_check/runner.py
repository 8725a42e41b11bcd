"""Runs one part of the device check: each step's command under its time limit
(:func:`device_check.budget.step_limit`), its output teed to a log and to stdout, a line per step
in ``work/steps.txt``, ``summary.txt`` rewritten after every step (a run cut short keeps one), and
at the end ``raw.tar.gz`` (the work folder's logs and raw JSON) and the summary on stdout.

A step at its limit gets SIGINT (pytest then still writes its junit and benchmark JSON for what
finished), then SIGKILL after :data:`~device_check.budget.KILL_GRACE_S`; its exit code is recorded
as 124.  No step stops the later ones.  ``$OUT`` receives at most :data:`MAX_OUT_FILES` files
(the device tool brings back 8): the kernels part writes env.txt, tests.log, tests_junit.xml,
bench.log, bench.json, summary.txt, raw.tar.gz; the trainer part env.txt, trainer.log,
summary.txt, raw.tar.gz.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Union

from . import parse
from .budget import KILL_GRACE_S, PART_BUDGET_S, step_limit, steps_of
from .env import available
from .summary import write_summary

MAX_OUT_FILES = 7
KERNEL_TESTS = ["tests/test_first_occurrence.py", "tests/test_advantages.py", "tests/test_pg_loss.py"]
BENCH_OPTS = ["-p", "no:cacheprovider", "--benchmark-only", "--benchmark-warmup=on", "--benchmark-warmup-iterations=3",
              "--benchmark-columns=min,median,mean,stddev,rounds", "-rs"]
#: per-test limit inside pytest steps (when pytest-timeout is there): a hung test cannot eat the step
PER_TEST_TIMEOUT_S = 120


@dataclass
class Context:
    """What the commands depend on: the part, the folders, the interpreter, CUDA, the optional
    packages found, the part's start (epoch seconds, the shell's) and budget."""

    part: str
    out: str
    work: str
    root: str
    t0: float
    budget: float
    cuda: bool = False
    have: Dict[str, bool] = field(default_factory=dict)
    py: str = sys.executable
    xdist_workers: int = 8
    time_scale: float = 1.0        # caps x this (a dry run on a slow machine; 1 on the device)


@dataclass
class Command:
    argv: List[str]
    log: str
    also: List[str] = field(default_factory=list)      # files the log is appended to afterwards


def command(name: str, ctx: Context) -> Union[Command, str]:
    """The command of step ``name``, or why it does not run here."""
    py, out, work = ctx.py, ctx.out, ctx.work
    timeout = [f"--timeout={PER_TEST_TIMEOUT_S}"] if ctx.have.get("pytest_timeout") else []
    if name == "tests":
        xdist = ["-n", str(ctx.xdist_workers)] if ctx.cuda and ctx.have.get("xdist") and ctx.xdist_workers > 0 else []
        return Command([py, "-m", "pytest", *KERNEL_TESTS, "-p", "no:cacheprovider", "-rfEs", *xdist, *timeout,
                        f"--junitxml={os.path.join(out, 'tests_junit.xml')}"], os.path.join(out, "tests.log"))
    if name == "k3check":
        return Command([py, "-m", "device_check.k3check"], os.path.join(work, "k3check.log"),
                       [os.path.join(out, "tests.log")])
    if name == "kgraph":
        return Command([py, "-m", "device_check.kgraph"], os.path.join(work, "kgraph.log"), [os.path.join(out, "bench.log")])
    if name in ("k1k2", "k3", "liger", "compile"):
        if not ctx.have.get("pytest_benchmark"):
            return "pytest-benchmark does not import (carry .device_wheels)"
        if name == "k1k2":
            target, sel = "bench/test_bench_k1_k2.py", "not test_k1_reference_cpu_path" if ctx.cuda else "not nothing"
        else:
            target = "bench/test_bench_pg_loss.py"
            sel = {"k3": "not liger and not compiled_eager" + (" and not test_cpu_" if ctx.cuda else ""),
                   "liger": "liger", "compile": "compiled_eager"}[name]
        return Command([py, "-m", "pytest", target, *BENCH_OPTS, *timeout, "-k", sel,
                        f"--benchmark-json={os.path.join(work, f'bench_{name}.json')}"], os.path.join(out, "bench.log"))
    if name == "update":
        if not ctx.have.get("deepspeed"):
            return "deepspeed does not import (carry .device_wheels)"
        return Command([py, "bench/gpu_update_step.py", *([] if ctx.cuda else ["--small"]), "--rounds", "2",
                        "--out", os.path.join(work, "update_step.json"),
                        "--work", "/tmp/tspo_update_model"],                  # the model (GBs) stays out of raw
                       os.path.join(work, "update.log"), [os.path.join(out, "trainer.log")])
    if name == "train":
        if not (ctx.have.get("deepspeed") and ctx.have.get("bm25s")):
            return "deepspeed or bm25s does not import (carry .device_wheels)"
        sets = ["rollout.engine=hf", "train.total_steps=3", "train.eval_every=3", "data.eval_limit=20",
                "train.checkpoint_every=0", f"output_dir={os.path.join(work, 'train_run')}"]
        return Command([py, "-m", "tspo_fast.cli", "train", "--config", "configs/tiny.yaml",
                        *[a for s in sets for a in ("--set", s)]],
                       os.path.join(work, "train.log"), [os.path.join(out, "trainer.log")])
    raise ValueError(f"unknown step {name!r}")


def step_env(ctx: Context) -> Dict[str, str]:
    """The steps' environment: the repository and bench/ on PYTHONPATH (nothing is built), Triton's
    interpreter off where CUDA runs the compiled kernels."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    paths = [ctx.root, os.path.join(ctx.root, "bench")] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    if ctx.cuda:
        env.pop("TRITON_INTERPRET", None)
    return env


def run_step(argv: List[str], log: str, limit_s: float, *, env: Optional[Dict[str, str]] = None,
             cwd: Optional[str] = None, echo=sys.stdout) -> tuple:
    """Run ``argv`` for at most ``limit_s`` seconds, its output appended to ``log`` and echoed;
    (exit code, seconds).  At the limit: SIGINT to its process group, SIGKILL after the grace;
    the exit code is then 124."""
    t = time.monotonic()
    with open(log, "a", errors="replace") as f:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                start_new_session=True, preexec_fn=_default_sigint, text=True, errors="replace",
                                bufsize=1)

        def pump():
            for line in proc.stdout:
                f.write(line)
                f.flush()
                if echo is not None:
                    echo.write(line)
                    echo.flush()

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            rc = proc.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            _signal(proc, signal.SIGINT)
            try:
                proc.wait(timeout=KILL_GRACE_S)
            except subprocess.TimeoutExpired:
                _signal(proc, signal.SIGKILL)
                proc.wait()
            rc = 124
        reader.join(timeout=5)
    return rc, time.monotonic() - t


def _default_sigint() -> None:
    """In the child: SIGINT back to its default.  A shell starts background jobs with SIGINT
    ignored, and Python then installs no KeyboardInterrupt handler: the step would not stop
    cleanly at its limit (pytest would write no junit or benchmark JSON) but be killed."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _signal(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def _append(src: str, dests: List[str]) -> None:
    try:
        with open(src, errors="replace") as f:
            text = f.read()
    except OSError:
        return
    for d in dests:
        with open(d, "a") as g:
            g.write(text)


def archive(out: str, work: str) -> None:
    """``out/raw.tar.gz``: the work folder's logs and raw JSON (not the trainer's checkpoints: MBs)."""
    with tarfile.open(os.path.join(out, "raw.tar.gz"), "w:gz") as tar:
        tar.add(work, arcname=".", filter=lambda ti: None if "/checkpoints" in ti.name else ti)


def run_part(ctx: Context, names: Optional[List[str]] = None, echo=sys.stdout) -> str:
    """Run the part's steps (``names``: a subset, in run order); returns the summary text."""
    os.makedirs(ctx.out, exist_ok=True)
    os.makedirs(ctx.work, exist_ok=True)
    env = step_env(ctx)
    steps_txt = os.path.join(ctx.work, "steps.txt")
    for step in steps_of(ctx.part, names):
        cmd = command(step.name, ctx)
        if isinstance(cmd, str):
            parse.write_step(steps_txt, parse.StepRecord(step.name, None, 0.0, 0, cmd))
            _say(echo, f"{step.name} skipped: {cmd}")
            continue
        lim = step_limit(int(step.cap_s * ctx.time_scale), time.time() - ctx.t0, ctx.budget)
        if lim == 0:
            parse.write_step(steps_txt, parse.StepRecord(step.name, None, 0.0, 0, f"no time left of {ctx.budget:.0f} s"))
            _say(echo, f"{step.name} skipped: no time left of the part's {ctx.budget:.0f} s")
            continue
        banner = f"==================== {step.name} (limit {lim} s, cap {step.cap_s} s) {time.strftime('%H:%M:%S')}"
        with open(cmd.log, "a") as f:
            f.write(banner + "\n")
        _say(echo, banner)
        rc, secs = run_step(cmd.argv, cmd.log, lim, env=env, cwd=ctx.root, echo=echo)
        _say(echo, f"{step.name} rc={rc} {secs:.1f} s (limit {lim} s)")
        parse.write_step(steps_txt, parse.StepRecord(step.name, rc, secs, lim))
        _append(cmd.log, cmd.also)
        write_summary(ctx.part, ctx.out, ctx.work)
    text = write_summary(ctx.part, ctx.out, ctx.work)
    archive(ctx.out, ctx.work)
    files = sorted(os.listdir(ctx.out))
    if len(files) > MAX_OUT_FILES:
        text += f"== WARNING: {len(files)} files in $OUT; the device tool brings back 8\n"
    return text


def _say(echo, line: str) -> None:
    if echo is not None:
        echo.write(line + "\n")
        echo.flush()


def context(part: str, out: str, work: str, *, t0: Optional[float] = None, budget: Optional[float] = None,
            xdist_workers: int = 8, time_scale: float = 1.0) -> Context:
    """The context of a run here; ``time_scale`` multiplies every cap and the part's budget (for a
    dry run on a slow machine: on CPU the kernels run in Triton's interpreter)."""
    import torch

    if time_scale <= 0:
        raise ValueError(f"--time-scale: must be > 0, got {time_scale}")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return Context(part=part, out=os.path.abspath(out), work=os.path.abspath(work), root=root,
                   t0=time.time() if t0 is None else t0,
                   budget=(PART_BUDGET_S[part] if budget is None else budget) * time_scale,
                   cuda=torch.cuda.is_available(), have=available(), xdist_workers=xdist_workers, time_scale=time_scale)
