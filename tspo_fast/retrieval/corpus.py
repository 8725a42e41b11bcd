"""The passage corpus: JSONL ``{id, contents}`` in the wiki-18 layout (``"Title"\\ntext``)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pj

__all__ = ["Corpus", "CorpusError", "split_title"]


class CorpusError(ValueError):
    """The corpus file is missing or malformed."""


def split_title(contents: str) -> tuple[str, str]:
    """Split wiki-18 ``contents`` into (title, text).

    The title is the first line with surrounding double quotes stripped; the text is the rest
    (stripped).  Contents without a newline give an empty text.
    """
    first, _, rest = contents.partition("\n")
    title = first.strip()
    if len(title) >= 2 and title[0] == '"' and title[-1] == '"':
        title = title[1:-1]
    return title, rest.strip()


@dataclass
class Corpus:
    """Passages kept as Arrow string columns (memory-friendly for millions of rows).

    Row ``i`` of the corpus is the ``i``-th line of the file; indexes store row numbers and
    the corpus turns them back into ``{"id", "contents"}`` documents.
    """

    ids: "object"  # pyarrow.ChunkedArray[string]
    contents: "object"  # pyarrow.ChunkedArray[string]
    path: str = ""

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Corpus":
        """Read a JSONL corpus with pyarrow; ``id`` may be a string or an integer column."""
        p = Path(path)
        if not p.is_file():
            raise CorpusError(f"corpus file not found: {p}")
        try:
            table = pj.read_json(p, read_options=pj.ReadOptions(block_size=1 << 24))
        except Exception as e:
            raise CorpusError(f"{p}: cannot read as JSONL: {e}") from e
        for col in ("id", "contents"):
            if col not in table.column_names:
                raise CorpusError(f"{p}: missing field '{col}' (columns: {table.column_names})")
        for col in ("id", "contents"):
            nulls = table.column(col).null_count
            if nulls:
                row = next(i for i, v in enumerate(table.column(col).is_null().to_pylist()) if v)
                raise CorpusError(f"{p}: row {row}: missing field '{col}'")
        ids = table.column("id")
        if ids.type != pa.string():
            ids = ids.cast(pa.string())
        contents = table.column("contents")
        if contents.type != pa.string():
            raise CorpusError(f"{p}: field 'contents' must be a string (got {contents.type})")
        return cls(ids=ids, contents=contents, path=str(p))

    @classmethod
    def from_docs(cls, docs: Sequence[dict]) -> "Corpus":
        """An in-memory corpus from ``[{"id", "contents"}, ...]`` (tests, small tools)."""
        return cls(ids=pa.chunked_array([pa.array([str(d["id"]) for d in docs], pa.string())]),
                   contents=pa.chunked_array([pa.array([d["contents"] for d in docs], pa.string())]))

    def check_unique_ids(self) -> None:
        """Raise :class:`CorpusError` naming the first id given to two rows (hits name passages by id)."""
        if pc.count_distinct(self.ids, mode="all").as_py() == len(self):
            return
        first: dict = {}
        for row, pid in enumerate(self.ids.to_pylist()):
            if pid in first:
                raise CorpusError(f"{self.path or '<memory>'}: row {row}: duplicate id {pid!r} (also row {first[pid]}); "
                                  "passage ids must be unique")
            first[pid] = row

    def texts(self, start: int = 0, stop: int | None = None) -> list[str]:
        """``contents`` of rows ``start:stop`` as Python strings."""
        stop = len(self) if stop is None else stop
        return self.contents.slice(start, stop - start).to_pylist()

    def docs(self, rows: Sequence[int]) -> list[dict]:
        """The documents at the given row numbers, as ``{"id", "contents"}`` dicts."""
        if len(rows) == 0:
            return []
        idx = pa.array(rows, pa.int64())
        return [{"id": i, "contents": c}
                for i, c in zip(self.ids.take(idx).to_pylist(), self.contents.take(idx).to_pylist())]
