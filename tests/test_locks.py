"""The locks a run meets at start-up (tspo_fast.training.locks): one run per output_dir, and the
lock torch takes while it builds or loads DeepSpeed's ops, which a killed build leaves behind
(every later start then waited for it forever, silently).  Real processes hold the locks."""
from __future__ import annotations

import inspect
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch.utils.cpp_extension as cpp_extension
from _procs import torchrun
from torch.utils.file_baton import FileBaton

from tspo_fast.training.locks import (
    LOCK_FILE,
    BuildLockError,
    RunLock,
    RunLockError,
    _holders,
    clear_stale_build_locks,
    extensions_root,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: the module alone, for the other processes of these tests (it needs torch only, not the package)
LOAD_LOCKS = ("import importlib.util; spec = importlib.util.spec_from_file_location('locks', "
              f"{os.path.join(ROOT, 'tspo_fast', 'training', 'locks.py')!r}); locks = importlib.util.module_from_spec(spec); "
              "spec.loader.exec_module(locks); ")


# ----------------------------------------------------------------------------- one run per output_dir
def test_a_second_run_is_refused_naming_the_folder_and_the_owner(tmp_path):
    folder = str(tmp_path / "run")
    lock = RunLock.acquire(folder)
    owner = json.load(open(os.path.join(folder, LOCK_FILE)))
    assert owner["pid"] == os.getpid() and owner["host"] and owner["started"]
    # another process (its own open file: flock refuses it as it would a second run)
    code = LOAD_LOCKS + (f"import sys\ntry: locks.RunLock.acquire({folder!r})\n"
                         "except locks.RunLockError as e: print(e); sys.exit(3)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert p.returncode == 3, p.stderr[-2000:]
    assert p.stdout.startswith(f"output_dir {folder} is in use by another run (pid {os.getpid()} on host "
                               f"{owner['host']}, started {owner['started']}"), p.stdout
    with pytest.raises(RunLockError, match="one run per output_dir"):     # a second lock in this process too
        RunLock.acquire(folder)
    lock.release()
    assert not os.path.exists(os.path.join(folder, LOCK_FILE))
    lock.release()                                                       # idempotent
    RunLock.acquire(folder).release()                                    # free again


def test_a_lock_left_by_a_killed_run_is_taken_over_with_a_warning(tmp_path):
    folder = str(tmp_path / "run")
    p = subprocess.Popen([sys.executable, "-c", LOAD_LOCKS + f"locks.RunLock.acquire({folder!r}); "
                                                          "print('locked', flush=True); import time; time.sleep(600)"],
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    with pytest.raises(RunLockError, match=f"pid {p.pid} "):
        RunLock.acquire(folder)
    p.kill()
    p.wait(30)
    said = []
    lock = RunLock.acquire(folder, say=said.append)
    assert len(said) == 1 and said[0].startswith(f"warning: output_dir {folder}: taking over the lock of a run that "
                                                 f"is gone (pid {p.pid} on host "), said
    assert json.load(open(os.path.join(folder, LOCK_FILE)))["pid"] == os.getpid()
    lock.release()


def test_world_size_2_one_lock_per_run_and_the_parameter_check_sees_every_shard(train_env, tmp_path):
    """torchrun, 2 ranks: rank 0 holds the one lock, both ranks refuse a second with the same message;
    under ZeRO-3 a NaN in rank 1's half of a weight is reported on both ranks."""
    p = subprocess.run(torchrun() + [os.path.join(ROOT, "tests", "_guard_ws2.py"), str(tmp_path)], cwd=ROOT, env=train_env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    r0, r1 = (json.load(open(tmp_path / f"{r}.json")) for r in (0, 1))
    assert r0["holds_lock"] and not r1["holds_lock"]
    assert r0["second"] == r1["second"] and r0["second"].startswith(
        f"output_dir {tmp_path / 'run'} is in use by another run (pid {r0['pid']} ")
    assert r0["shard"] < 16 * 16                                          # each rank holds a part
    for r in (r0, r1):
        assert r["bad_before"] == {} and r["norm"] == pytest.approx(r["full_norm"], rel=1e-6)
        assert r["bad_after"] == {"0.weight": 1}
    assert not os.path.exists(tmp_path / "run" / LOCK_FILE)


# ----------------------------------------------------------------------------- DeepSpeed's build lock
def test_torch_builds_under_the_lock_file_the_check_looks_at(tmp_path, monkeypatch):
    """What the check relies on, in torch as installed: a JIT build's lock is ``<root>/<name>/lock``,
    taken with FileBaton, whose holder keeps the file open until it releases it."""
    assert "FileBaton(os.path.join(build_directory, 'lock'))" in inspect.getsource(cpp_extension._jit_compile)
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    assert os.path.dirname(cpp_extension._get_build_directory("deepspeed_shm_comm", False)) == extensions_root()
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert extensions_root() == str(tmp_path)
    lock = str(tmp_path / "op" / "lock")
    os.makedirs(os.path.dirname(lock))
    baton = FileBaton(lock)
    assert baton.try_acquire()
    assert _holders(lock) == [os.getpid()]
    baton.release()
    assert not os.path.exists(lock)


def _left_by_a_killed_build(root, name="deepspeed_shm_comm"):
    """A lock file whose FileBaton holder was killed (-9) mid-build."""
    os.makedirs(os.path.join(root, name), exist_ok=True)
    lock = os.path.join(root, name, "lock")
    p = subprocess.Popen([sys.executable, "-c", "import sys, time; from torch.utils.file_baton import FileBaton; "
                                                f"assert FileBaton({lock!r}).try_acquire(); print('held', flush=True); "
                                                "time.sleep(600)"], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return lock, p


def test_a_stale_build_lock_is_removed_with_a_warning_and_a_held_one_reported(tmp_path):
    lock, holder = _left_by_a_killed_build(str(tmp_path))
    said = []
    with pytest.raises(BuildLockError) as e:                  # held by a live process: waited for, then named
        clear_stale_build_locks(str(tmp_path), wait_s=4.0, poll_s=0.1, say=said.append)
    assert str(e.value).startswith(f"{lock}: a JIT extension build lock is still held after 4 s (pid {holder.pid} (")
    assert len(said) == 1 and said[0].startswith(f"waiting for {lock}, the lock of a JIT extension build or load "
                                                 f"(pid {holder.pid} (")
    holder.kill()
    holder.wait(30)
    assert os.path.exists(lock)                               # left behind: every later start would wait forever
    said.clear()
    other = []                                                # another local rank: waits for local rank 0
    with pytest.raises(BuildLockError, match="local rank 0 clears stale locks"):
        clear_stale_build_locks(str(tmp_path), wait_s=0.5, poll_s=0.1, clear=False, say=other.append)
    t0 = time.monotonic()
    clear_stale_build_locks(str(tmp_path), wait_s=60, poll_s=0.1, clear=True, say=said.append)
    assert not os.path.exists(lock) and time.monotonic() - t0 < 10
    assert said == [f"warning: removed a stale lock left by a JIT extension build that was killed: {lock} (no process "
                    "holds it; DeepSpeed would have waited for it forever)"]
    clear_stale_build_locks(str(tmp_path), wait_s=1, say=said.append)     # nothing left: nothing said
    assert len(said) == 1


def test_a_start_after_a_killed_build_does_not_hang(train_env, tmp_path):
    """End to end: DeepSpeed's own op folder (already built) with the lock a killed build left; a
    process starting the distributed setup goes through, saying which file it removed."""
    built = os.path.join(extensions_root(), "deepspeed_shm_comm")
    code = "from tspo_fast.training.distributed import init_distributed; init_distributed(); print('started')"
    if not os.path.isfile(os.path.join(built, "deepspeed_shm_comm.so")):     # built once per machine (~70 s)
        subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=train_env, check=True, timeout=900,
                       capture_output=True)
    root = str(tmp_path / "ext")
    shutil.copytree(built, os.path.join(root, "deepspeed_shm_comm"))         # mtimes kept: nothing to rebuild
    lock, holder = _left_by_a_killed_build(root)
    holder.kill()
    holder.wait(30)
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=dict(train_env, TORCH_EXTENSIONS_DIR=root),
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0 and p.stdout.strip().splitlines()[-1] == "started", p.stderr[-3000:]
    assert f"removed a stale lock left by a JIT extension build that was killed: {lock}" in p.stderr
    assert not os.path.exists(lock)
