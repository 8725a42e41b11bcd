"""Data files named in a config: a path, or ``bundled:train`` / ``bundled:test`` (the embedded world)."""
from __future__ import annotations

import os
from typing import List, Sequence

from ..world import qa_path
from .qa import DataError, QAExample, load_examples

__all__ = ["resolve_data_file", "load_split"]


def resolve_data_file(name: str) -> str:
    """The path of a config's data file; ``bundled:<split>`` is the embedded world's set."""
    if name.startswith("bundled:"):
        split = name.split(":", 1)[1]
        try:
            return str(qa_path(split))
        except ValueError:
            raise DataError(f"data: unknown bundled set {name!r}; use bundled:train or bundled:test") from None
    if not os.path.exists(name):
        raise DataError(f"data file not found: {name}")
    return name


def load_split(files: Sequence[str]) -> List[QAExample]:
    """Examples of every file in order (uids must be unique across files)."""
    out: List[QAExample] = []
    for f in files:
        out += load_examples(resolve_data_file(f))
    return out
