"""``bundled:[<world>-]<kind>``: an index over a bundled world's corpus, built into the cache on first use."""
from __future__ import annotations

import hashlib
import os

from ..cache import build_once, cache_dir
from ..world import WORLDS, corpus_path, split_bundled
from .index import build_index

__all__ = ["bundled_index", "resolve_index"]


def bundled_index(kind: str = "bm25", world: str = "world") -> str:
    """The ``kind`` index folder of a bundled world (a regenerated world gets a new one)."""
    corpus = corpus_path(world)
    digest = hashlib.sha256(corpus.read_bytes()).hexdigest()[:12]
    folder = os.path.join(cache_dir(), f"{world}-{kind}-{digest}")
    return build_once(folder, "meta.json", lambda tmp: build_index(corpus, kind, tmp, copy_corpus=True, progress=False))


def resolve_index(name: str) -> str:
    """An index folder from a config value: a folder, or ``bundled:[<world>-](bm25|dense)``."""
    if name.startswith("bundled:"):
        world, kind = split_bundled(name)
        if kind not in ("bm25", "dense"):
            known = ", ".join(f"bundled:{w + '-' if w != 'world' else ''}{k}" for w in WORLDS for k in ("bm25", "dense"))
            raise ValueError(f"retrieval.index: unknown bundled index {name!r}; the bundled indexes are {known}")
        return bundled_index(kind, world)
    if not os.path.isdir(name):
        raise FileNotFoundError(f"retrieval.index: no index folder at {name}")
    return name
