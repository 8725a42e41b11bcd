"""``bundled:<kind>``: an index over the embedded world's corpus, built into the cache on first use."""
from __future__ import annotations

import hashlib
import os

from ..cache import build_once, cache_dir
from ..world import corpus_path
from .index import build_index

__all__ = ["bundled_index", "resolve_index"]


def bundled_index(kind: str = "bm25") -> str:
    """The embedded world's ``kind`` index folder (a regenerated world gets a new one)."""
    digest = hashlib.sha256(corpus_path().read_bytes()).hexdigest()[:12]
    folder = os.path.join(cache_dir(), f"world-{kind}-{digest}")
    return build_once(folder, "meta.json",
                      lambda tmp: build_index(corpus_path(), kind, tmp, copy_corpus=True, progress=False))


def resolve_index(name: str) -> str:
    """An index folder from a config value: a folder, or ``bundled:bm25`` / ``bundled:dense``."""
    if name.startswith("bundled:"):
        kind = name.split(":", 1)[1]
        if kind not in ("bm25", "dense"):
            raise ValueError(f"retrieval.index: unknown bundled index {name!r}; use bundled:bm25 or bundled:dense")
        return bundled_index(kind)
    if not os.path.isdir(name):
        raise FileNotFoundError(f"retrieval.index: no index folder at {name}")
    return name
