"""Where built artefacts (bundled models, indexes) live: ``$TSPO_FAST_CACHE`` or ``~/.cache/tspo-fast``."""
from __future__ import annotations

import hashlib
import os
import shutil
from typing import Callable, Tuple

__all__ = ["cache_dir", "build_once", "hash_file", "file_sha256"]


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


def hash_file(path: str, fsync: bool = False, chunk: int = 8 << 20) -> Tuple[int, str]:
    """``path``'s size in bytes and SHA-256 (hex), read in ``chunk``-byte blocks; ``fsync``: also
    flush it to disk before returning (a checkpoint's files, hashed as they are written)."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
            size += len(block)
        if fsync:
            os.fsync(f.fileno())
    return size, h.hexdigest()


def file_sha256(path: str) -> str:
    """``path``'s SHA-256 (hex): what keys a built artefact to its source file in the cache."""
    return hash_file(path)[1]
