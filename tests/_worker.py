"""How the tests' torchrun workers (``_update_step.py``, ``_sync_ws2.py``) start and leave.

A worker dumps every thread's Python stack if it dies by a signal (faulthandler), and leaves
with ``os._exit`` once its work is done and written: DeepSpeed keeps its gloo process groups
(and their threads) in module state, so ``destroy_process_group`` does not free them and their
destructors run during interpreter teardown, where they can abort the process ("terminate
called without an active exception", seen once in CI on a world-size-2 worker after its result
was complete).  A worker has nothing left to tear down at that point; its exit status then
reports its work only.  The trainer does not take this shortcut.
"""
from __future__ import annotations

import faulthandler
import os
import sys
from typing import Callable


def run_worker(main: Callable[..., None], *args) -> None:
    faulthandler.enable()
    main(*args)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
