"""Data files named in a config: a path, or a bundled world's set (``bundled:train`` / ``bundled:test``,
``bundled:hops-train`` / ``bundled:hops-test``)."""
from __future__ import annotations

import os
from typing import Dict, List, Sequence

from ..cache import file_sha256
from ..world import WORLDS, qa_path, split_bundled
from .qa import DataError, QAExample, load_examples

__all__ = ["resolve_data_file", "load_split"]


def resolve_data_file(name: str) -> str:
    """The path of a config's data file; ``bundled:[<world>-]<split>`` is a bundled world's set."""
    if name.startswith("bundled:"):
        world, split = split_bundled(name)
        try:
            return str(qa_path(split, world))
        except ValueError:
            known = ", ".join(f"bundled:{w + '-' if w != 'world' else ''}{s}" for w in WORLDS for s in ("train", "test"))
            raise DataError(f"data: unknown bundled set {name!r}; the bundled sets are {known}") from None
    if not os.path.exists(name):
        raise DataError(f"data file not found: {name}")
    return name


def load_split(files: Sequence[str]) -> List[QAExample]:
    """Examples of every file in order.  A file listed twice (or two files with the same bytes)
    and a uid that occurs in two files are errors naming both."""
    out: List[QAExample] = []
    by_digest: Dict[str, str] = {}
    by_uid: Dict[str, str] = {}
    for f in files:
        path = resolve_data_file(f)
        digest = file_sha256(path)
        if digest in by_digest:
            raise DataError(f"{path}: the same file (same contents) as {by_digest[digest]}, listed twice: "
                            "its questions would be drawn twice as often")
        by_digest[digest] = path
        examples = load_examples(path)
        if not examples:
            raise DataError(f"{path}: the data file has no questions (no rows)")
        for i, ex in enumerate(examples):
            if ex.uid in by_uid:
                raise DataError(f"{path}: row {i}: duplicate uid {ex.uid!r} (also in {by_uid[ex.uid]})")
            by_uid[ex.uid] = path
        out += examples
    return out
