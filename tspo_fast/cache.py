"""Where built artefacts (bundled models, indexes) live: ``$TSPO_FAST_CACHE`` or ``~/.cache/tspo-fast``."""
from __future__ import annotations

import os
import shutil
from typing import Callable

__all__ = ["cache_dir", "build_once"]


def cache_dir() -> str:
    """``$TSPO_FAST_CACHE`` or ``~/.cache/tspo-fast``."""
    return os.environ.get("TSPO_FAST_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "tspo-fast"))


def build_once(folder: str, marker: str, build: Callable[[str], object]) -> str:
    """``folder`` holding ``marker``, built by ``build(tmp)`` into a temporary folder and renamed
    on first use (a process that loses the race to build it keeps the winner's copy)."""
    if os.path.exists(os.path.join(folder, marker)):
        return folder
    os.makedirs(os.path.dirname(folder) or ".", exist_ok=True)
    tmp = folder + f".tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    build(tmp)
    try:
        os.replace(tmp, folder)
    except OSError:  # another process built it first
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
