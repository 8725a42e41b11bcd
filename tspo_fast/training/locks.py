"""The two locks a run meets at start-up: its own, on ``output_dir``, and the one torch takes while
it builds or loads a JIT extension (DeepSpeed's ops).

**One run per output_dir** (:func:`lock_output_dir`): rank 0 holds an exclusive ``flock`` on
``<output_dir>/run.lock`` for the whole run; the file says who holds it (pid, host, start time,
command).  A second run into the folder is refused with a one-line :class:`RunLockError` naming the
folder and that owner.  The kernel drops the ``flock`` when its process dies, however it dies, so
a lock file whose ``flock`` is free belongs to a run that is gone: it is taken over with a warning
naming the run.  A run that ends (or fails) removes the file.  The other ranks learn rank 0's
verdict (one lock per run).

**DeepSpeed's extension build lock** (:func:`clear_stale_build_locks`): torch builds and loads JIT
extensions (DeepSpeed's shared-memory op ``deepspeed_shm_comm`` at ``init_distributed``; CPU Adam
with ``train.offload_optimizer``) under a lock file, ``<extensions root>/<op name>/lock``, created
with ``O_CREAT | O_EXCL`` and held open until the build or load ends
(``torch.utils.file_baton.FileBaton``, used by ``torch.utils.cpp_extension._jit_compile``; the root
is ``TORCH_EXTENSIONS_DIR``, else ``<user cache>/torch_extensions/py<version>_<accelerator>``).  A
process killed while it holds the file leaves it behind, and every later process waits for it
forever, silently (``FileBaton.wait`` polls until the file is gone).  Before DeepSpeed starts, each
lock file there is checked: a lock that no process of this machine holds open and no process runs
in the folder of (``/proc/<pid>/fd`` and ``/proc/<pid>/cwd``, read twice, half a second apart; the
``ninja`` and compilers of a killed build go on in that folder until they finish) is stale and is
removed, with a warning naming it; a lock a live process holds is waited for, reported after a few
seconds naming the file and the process, and after ``wait_s`` an error names both (stop that
process if it is stuck).  Only local
rank 0 removes locks; the other ranks of the machine wait for it.  The check sees the processes of
this machine that this user may inspect (a build in this user's folder is one of them): on a
folder several machines share, give each machine its own ``TORCH_EXTENSIONS_DIR``.
"""
from __future__ import annotations

import atexit
import datetime
import fcntl
import glob
import json
import os
import socket
import sys
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist
from torch.utils.cpp_extension import get_default_build_root

__all__ = ["LOCK_FILE", "RunLockError", "BuildLockError", "RunLock", "lock_output_dir", "extensions_root",
           "clear_stale_build_locks"]

#: the run lock's file name inside ``output_dir``
LOCK_FILE = "run.lock"


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class RunLockError(RuntimeError):
    """Another live run holds the output folder; the message names the folder and that run."""


class BuildLockError(RuntimeError):
    """A JIT extension build lock stayed held past the wait; the message names the file and the holder."""


# ----------------------------------------------------------------------------- one run per output_dir
def _owner_text(owner: Dict) -> str:
    if not owner:
        return "owner unknown"
    cmd = str(owner.get("command", ""))
    cmd = cmd if len(cmd) <= 120 else cmd[:117] + "..."
    return (f"pid {owner.get('pid', '?')} on host {owner.get('host', '?')}, started {owner.get('started', '?')}"
            + (f": {cmd}" if cmd else ""))


def _read_owner(fd: int) -> Dict:
    try:
        raw = os.pread(fd, 1 << 16, 0)
        owner = json.loads(raw.decode("utf-8")) if raw.strip() else {}
        return owner if isinstance(owner, dict) else {}
    except (OSError, ValueError):
        return {}


class RunLock:
    """An exclusive lock on ``<folder>/run.lock`` held by this process (:meth:`acquire`)."""

    def __init__(self, path: str, fd: int):
        self.path, self.fd = path, fd
        atexit.register(self.release)

    @classmethod
    def acquire(cls, folder: str, say: Callable[[str], None] = _stderr) -> "RunLock":
        """Take the lock of ``folder`` (created if missing), or raise :class:`RunLockError` naming
        the run that holds it.  A lock file left by a run that is gone is taken over, with a warning."""
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, LOCK_FILE)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:                  # held by a live process (EWOULDBLOCK)
                owner = _read_owner(fd)
                os.close(fd)
                raise RunLockError(f"output_dir {folder} is in use by another run ({_owner_text(owner)}; lock file "
                                   f"{path}): one run per output_dir; wait for that run to end, or give this one "
                                   "another output_dir") from None
            try:                             # a run that was ending may have removed the file meanwhile
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            previous = _read_owner(fd)
            if previous:
                say(f"warning: output_dir {folder}: taking over the lock of a run that is gone "
                    f"({_owner_text(previous)}; lock file {path})")
            owner = {"pid": os.getpid(), "host": socket.gethostname(),
                     "started": datetime.datetime.now().isoformat(timespec="seconds"),
                     "command": " ".join(sys.argv)}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(owner) + "\n").encode("utf-8"), 0)
            os.fsync(fd)
            return cls(path, fd)

    def release(self) -> None:
        """Remove the lock file and drop the lock (idempotent)."""
        if self.fd is None:
            return
        try:
            if os.path.samestat(os.fstat(self.fd), os.stat(self.path)):
                os.remove(self.path)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None
        atexit.unregister(self.release)


def lock_output_dir(folder: str, say: Callable[[str], None] = _stderr) -> Optional[RunLock]:
    """Collective: rank 0 takes ``folder``'s run lock (:meth:`RunLock.acquire`), every rank learns
    whether it could; all raise the same :class:`RunLockError` when it could not.  Returns the
    lock on rank 0, None on the others."""
    lock, error = None, None
    distributed = dist.is_initialized() and dist.get_world_size() > 1
    if not distributed or dist.get_rank() == 0:
        try:
            lock = RunLock.acquire(folder, say)
        except RunLockError as e:
            error = str(e)
    if distributed:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise RunLockError(error)
    return lock


# ----------------------------------------------------------------------------- extension build locks
def extensions_root() -> str:
    """The folder torch builds JIT extensions under (``torch.utils.cpp_extension._get_build_directory``
    of torch 2.13 without the op name): ``TORCH_EXTENSIONS_DIR``, else the user cache's
    ``torch_extensions/py<major><minor><abiflags>_<rocmNN | cuNNN | cpu>``."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root is not None:
        return root
    if torch.version.hip is not None:
        accel = f"rocm{torch.version.hip.replace('.', '')}"
    elif torch.version.cuda is not None:
        accel = f"cu{torch.version.cuda.replace('.', '')}"
    else:
        accel = "cpu"
    py = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    return os.path.join(get_default_build_root(), f"{py}_{accel}")


def _holders(path: str) -> Optional[List[int]]:
    """Pids of this machine's processes that have ``path`` open, or that run in its folder (torch
    runs ``ninja`` there, and a build's ``ninja`` and compilers outlive a killed Python process);
    None where there is no ``/proc`` to tell.  Processes this user may not inspect (other users',
    or outside this container) are not counted: the build that made a lock in this user's folder
    is this user's process, which the user can inspect."""
    if not os.path.isdir("/proc/self/fd"):
        return None
    try:
        target, folder = os.stat(path), os.stat(os.path.dirname(os.path.abspath(path)))
    except FileNotFoundError:
        return []
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if int(entry) != os.getpid() and os.path.samestat(os.stat(f"/proc/{entry}/cwd"), folder):
                found.append(int(entry))
                continue
            fds = os.listdir(f"/proc/{entry}/fd")
        except OSError:                  # ended meanwhile, or not ours to inspect
            continue
        for fd in fds:
            try:
                if os.path.samestat(os.stat(f"/proc/{entry}/fd/{fd}"), target):
                    found.append(int(entry))
                    break
            except OSError:
                continue
    return found


def _process(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
    except OSError:
        cmd = ""
    cmd = cmd if len(cmd) <= 100 else cmd[:97] + "..."
    return f"pid {pid}" + (f" ({cmd})" if cmd else "")


def _inode(path: str) -> Optional[tuple]:
    try:
        st = os.stat(path)
        return st.st_dev, st.st_ino
    except FileNotFoundError:
        return None


def _settle(lock: str, clear: bool, wait_s: float, poll_s: float, say: Callable[[str], None]) -> None:
    """Wait until ``lock`` is gone; remove it when no process holds it (``clear``)."""
    start = time.monotonic()
    reported = False
    orphan_since: Optional[tuple] = None        # the inode seen without a holder on the previous look
    while True:
        ino = _inode(lock)
        if ino is None:
            return
        holders = _holders(lock)
        if holders == [] and clear:
            if orphan_since == ino and _inode(lock) == ino:   # no holder on two looks at one file: stale
                try:
                    os.remove(lock)
                except FileNotFoundError:
                    return
                say(f"warning: removed a stale lock left by a JIT extension build that was killed: {lock} (no "
                    "process holds it; DeepSpeed would have waited for it forever)")
                return
            orphan_since = ino
        else:
            orphan_since = None
        waited = time.monotonic() - start
        who = ", ".join(_process(p) for p in holders) if holders else (
            "local rank 0 clears stale locks" if holders == [] else "no /proc here to see its holder")
        if waited > wait_s:
            raise BuildLockError(f"{lock}: a JIT extension build lock is still held after {wait_s:.0f} s ({who}); "
                                 "if that process is stuck, stop it, or remove the file once no build runs")
        if not reported and waited > 3.0:
            say(f"waiting for {lock}, the lock of a JIT extension build or load ({who}; up to {wait_s:.0f} s)")
            reported = True
        time.sleep(poll_s)


def clear_stale_build_locks(root: Optional[str] = None, *, wait_s: float = 600.0, poll_s: float = 0.5,
                            clear: Optional[bool] = None, say: Callable[[str], None] = _stderr) -> None:
    """Make sure no lock of ``root`` (:func:`extensions_root`) will make DeepSpeed wait forever:
    stale ones are removed (``clear``; default: on local rank 0), held ones waited for up to
    ``wait_s`` seconds (reported, then :class:`BuildLockError`)."""
    root = root or extensions_root()
    if clear is None:
        clear = int(os.environ.get("LOCAL_RANK", "0") or 0) == 0
    for lock in sorted(glob.glob(os.path.join(glob.escape(root), "*", "lock"))):
        _settle(lock, clear, wait_s, poll_s, say)
