"""Question-answering data: loading, converting and prompt building (docs/algorithm.md §1, §6).

Two on-disk layouts are understood, both as JSONL and as parquet:

* **Search-R1** rows: ``data_source``, ``prompt`` (a list of ``{role, content}`` messages),
  ``reward_model.ground_truth.target`` (the gold aliases), ``extra_info.index``; Search-R1's
  own files also keep the original ``id``, ``question`` and ``golden_answers`` columns, which
  are used when present.
* **FlashRAG** rows: ``{id, question, golden_answers}`` (``data_source`` is taken from the
  argument, or from the file name).

Every row becomes a :class:`QAExample`.  Files are read with ``pyarrow`` (JSONL and parquet);
errors name the file and the 0-based row (blank lines in JSONL are not counted).  Rows are checked
as they are read: the question must be a string that is not empty once whitespace and ``?`` are
stripped; the aliases a string or a list of strings, none empty; text must be valid UTF-8; uids
must be unique.

The prompt is Search-R1's ``make_prefix`` text: one line, ending in ``"\\n"``, with the question
stripped and a ``?`` appended if missing.  :func:`build_prompt` wraps it in the tokenizer's
chat template (``add_generation_prompt=True``) when the tokenizer has one.
"""
from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import pyarrow as pa
import pyarrow.json as pj
import pyarrow.parquet as pq

from ..protocol import build_prompt, normalize_question, prompt_text, question_from_prompt

__all__ = [
    "QAExample",
    "DataError",
    "read_rows",
    "write_rows",
    "detect_layout",
    "load_examples",
    "examples_from_rows",
    "to_searchr1_row",
    "to_flashrag_row",
    "convert_file",
]



class DataError(ValueError):
    """A data file is missing, unreadable, or has a row that lacks a required field."""


@dataclass(frozen=True)
class QAExample:
    """One question with its gold aliases.

    Attributes:
        uid: stable unique id, ``"{data_source}/{id}"``; used as the rollout group id.
        question: the question, stripped, ending in ``?``.
        aliases: the gold answers (non-empty); any of them counts as correct.
        data_source: the dataset name (``nq``, ``hotpotqa``, ``world_2hop``, ...).
        index: the row's ``extra_info.index`` (Search-R1) or its position in the file.
        split: ``extra_info.split`` when known (``train``/``test``), else ``""``.
        id: the row's own id (``id`` column), or ``str(index)`` when there is none.
        extra: the remaining ``extra_info`` fields (e.g. ``hops``, ``support`` in the world).
    """

    uid: str
    question: str
    aliases: tuple[str, ...]
    data_source: str
    index: int = 0
    split: str = ""
    id: str = ""
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def prompt(self, tokenizer: Any = None) -> str:
        """The episode prompt for this question (see :func:`build_prompt`)."""
        return build_prompt(self.question, tokenizer)


# --------------------------------------------------------------------------------------------
# files


def _is_parquet(path: Path) -> bool:
    return path.suffix.lower() in {".parquet", ".pq"}


def _check_utf8(p: Path, data: bytes) -> None:
    """JSONL bytes must be UTF-8; the error names the row (0-based, blank lines not counted) and line."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        lines = data[:e.start].split(b"\n")
        row = sum(1 for line in lines[:-1] if line.strip())
        raise DataError(f"{p}: row {row} (line {len(lines)}): not valid UTF-8 (byte 0x{data[e.start]:02x} at "
                        f"column {len(lines[-1]) + 1}); re-encode the file as UTF-8") from None


def _json_lines(p: Path, text: str) -> list[dict[str, Any]]:
    """JSONL parsed with :mod:`json`, one object per non-blank line (what pyarrow cannot read:
    columns whose type changes between rows, which the row checks then report by field)."""
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise DataError(f"{p}: row {len(rows)} (line {n}): not valid JSON: {e}") from None
        if not isinstance(row, dict):
            raise DataError(f"{p}: row {len(rows)} (line {n}): expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def read_rows(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a JSONL or parquet file into a list of dicts (``pyarrow``)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data file not found: {p}")
    try:
        if _is_parquet(p):
            table = pq.read_table(p)
        else:
            data = p.read_bytes()
            _check_utf8(p, data)
            try:
                table = pj.read_json(io.BytesIO(data))
            except Exception:  # mixed types or bad JSON: read it line by line, naming the row
                return _json_lines(p, data.decode("utf-8"))
    except DataError:
        raise
    except Exception as e:  # pyarrow raises ArrowInvalid with the row number in the message
        raise DataError(f"{p}: cannot read as {'parquet' if _is_parquet(p) else 'JSONL'}: {e}") from e
    try:
        return table.to_pylist()
    except UnicodeDecodeError:     # parquet strings are not validated on read: find the row
        for i in range(table.num_rows):
            try:
                table.slice(i, 1).to_pylist()
            except UnicodeDecodeError as e:
                raise DataError(f"{p}: row {i}: not valid UTF-8 ({e})") from None
        raise


def write_rows(rows: Sequence[dict[str, Any]], path: str | os.PathLike) -> Path:
    """Write rows as JSONL (one compact JSON object per line) or parquet, by the suffix."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    if _is_parquet(p):
        pq.write_table(pa.Table.from_pylist(list(rows)), p)
    else:
        with open(p, "w", encoding="utf-8", newline="\n") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return p


def detect_layout(row: dict[str, Any]) -> str:
    """``"searchr1"`` when the row has ``prompt`` or ``reward_model``, else ``"flashrag"``."""
    if "prompt" in row or "reward_model" in row:
        return "searchr1"
    return "flashrag"


def _where(path: Any, i: int) -> str:
    return f"{path}: row {i}"


def _aliases(value: Any, path: Any, i: int, field_name: str) -> tuple[str, ...]:
    if value is None:
        raise DataError(f"{_where(path, i)}: missing field '{field_name}'")
    if isinstance(value, str):
        value = [value]
    if hasattr(value, "tolist") and not isinstance(value, (bytes, dict)):   # a NumPy array (pandas rows)
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise DataError(f"{_where(path, i)}: field '{field_name}' must be a string or a list of strings, "
                        f"got {type(value).__name__} {_short(value)}")
    if not value:
        raise DataError(f"{_where(path, i)}: field '{field_name}' is an empty alias list")
    for j, a in enumerate(value):
        if not isinstance(a, str):
            raise DataError(f"{_where(path, i)}: field '{field_name}[{j}]' must be a string, "
                            f"got {type(a).__name__} {_short(a)}")
        if not a.strip():
            raise DataError(f"{_where(path, i)}: field '{field_name}[{j}]' is empty")
    return tuple(value)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _question(value: Any, path: Any, i: int, field_name: str) -> str:
    """The normalised question; not a string, or nothing left once whitespace and '?' are stripped: an error."""
    if not isinstance(value, str):
        raise DataError(f"{_where(path, i)}: field '{field_name}' must be a string, "
                        f"got {type(value).__name__} {_short(value)}")
    if not value.strip().rstrip("?").strip():
        raise DataError(f"{_where(path, i)}: empty question (field '{field_name}' is {value!r})")
    return normalize_question(value)


def _text_field(row: dict[str, Any], key: str, path: Any, i: int) -> Any:
    """``row[key]`` when it is a string or an integer (ids, data sources), else an error."""
    value = row.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, (str, int))):
        raise DataError(f"{_where(path, i)}: field '{key}' must be a string, got {type(value).__name__} "
                        f"{_short(value)}")
    return value


def _mapping(row: dict[str, Any], key: str, path: Any, i: int) -> dict[str, Any]:
    """The non-null entries of ``row[key]``, an object (or absent / null: empty)."""
    value = row.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise DataError(f"{_where(path, i)}: field '{key}' must be an object (a mapping), got "
                        f"{type(value).__name__} {_short(value)}")
    return {k: v for k, v in value.items() if v is not None}


def _index(value: Any, path: Any, i: int, field_name: str) -> int:
    """An integer index: an int, a float with no fraction, or a string of digits; else an error."""
    if isinstance(value, bool):
        ok = False
    elif isinstance(value, int):
        return value
    elif isinstance(value, float):
        ok = value.is_integer()
    else:
        ok = isinstance(value, str) and value.strip().lstrip("-").isdigit()
    if not ok:
        raise DataError(f"{_where(path, i)}: field '{field_name}' must be an integer, got "
                        f"{type(value).__name__} {_short(value)}")
    return int(value)


def _searchr1_example(row: dict[str, Any], path: Any, i: int, default_source: str) -> QAExample:
    rm = row.get("reward_model")
    gt = rm.get("ground_truth") if isinstance(rm, dict) else None
    target = gt.get("target") if isinstance(gt, dict) else None
    if target is None and row.get("golden_answers") is not None:
        target = row["golden_answers"]
    aliases = _aliases(target, path, i, "reward_model.ground_truth.target")

    question = row.get("question")
    field_name = "question"
    if question is None or question == "":
        prompt = row.get("prompt")
        if not prompt:
            raise DataError(f"{_where(path, i)}: missing field 'prompt' (and no 'question')")
        if not isinstance(prompt, (list, tuple)):
            raise DataError(f"{_where(path, i)}: field 'prompt' must be a list of {{role, content}} messages, "
                            f"got {type(prompt).__name__}")
        users = [m for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        if not users or not users[-1].get("content"):
            raise DataError(f"{_where(path, i)}: field 'prompt' has no user message with content")
        content = users[-1]["content"]
        if not isinstance(content, str):
            raise DataError(f"{_where(path, i)}: field 'prompt' user content must be a string, "
                            f"got {type(content).__name__}")
        question, field_name = question_from_prompt(content), "prompt"
    question = _question(question, path, i, field_name)

    data_source = _text_field(row, "data_source", path, i) or default_source
    if not data_source:
        raise DataError(f"{_where(path, i)}: missing field 'data_source'")
    extra = _mapping(row, "extra_info", path, i)
    if extra.get("index") is None:
        raise DataError(f"{_where(path, i)}: missing field 'extra_info.index'")
    index = _index(extra.pop("index"), path, i, "extra_info.index")
    split = str(extra.pop("split", "") or "")
    rid = _text_field(row, "id", path, i)
    rid = str(rid) if rid is not None else str(index)
    return QAExample(uid=f"{data_source}/{rid}", question=question, aliases=aliases,
                     data_source=str(data_source), index=index, split=split, id=rid, extra=extra)


def _flashrag_example(row: dict[str, Any], path: Any, i: int, default_source: str) -> QAExample:
    question = row.get("question")
    if question is None:
        raise DataError(f"{_where(path, i)}: missing field 'question'")
    question = _question(question, path, i, "question")
    aliases = _aliases(row.get("golden_answers"), path, i, "golden_answers")
    data_source = _text_field(row, "data_source", path, i) or default_source
    if not data_source:
        raise DataError(f"{_where(path, i)}: no data_source (pass data_source=...)")
    rid = _text_field(row, "id", path, i)
    rid = str(rid) if rid is not None else str(i)
    extra = _mapping(row, "metadata", path, i)
    index = _index(extra.pop("index"), path, i, "metadata.index") if extra.get("index") is not None else i
    return QAExample(uid=f"{data_source}/{rid}", question=question,
                     aliases=aliases, data_source=str(data_source), index=index,
                     split=str(row.get("split") or ""), id=rid, extra=extra)


def examples_from_rows(rows: Iterable[dict[str, Any]], *, source: Any = "<rows>",
                       data_source: str = "", layout: str = "auto") -> list[QAExample]:
    """Turn rows (either layout) into examples; ``source`` names them in error messages."""
    out = []
    for i, row in enumerate(rows):
        kind = detect_layout(row) if layout == "auto" else layout
        if kind == "searchr1":
            out.append(_searchr1_example(row, source, i, data_source))
        elif kind == "flashrag":
            out.append(_flashrag_example(row, source, i, data_source))
        else:
            raise ValueError(f"unknown layout {layout!r} (expected auto, searchr1 or flashrag)")
    return out


def load_examples(path: str | os.PathLike, *, data_source: str | None = None,
                  layout: str = "auto", limit: int | None = None) -> list[QAExample]:
    """Load a Search-R1 or FlashRAG file (JSONL or parquet) as :class:`QAExample` s.

    Args:
        path: the file.
        data_source: used for rows without a ``data_source`` (FlashRAG); defaults to the file
            stem's parent folder name for FlashRAG files named ``test.jsonl`` etc., else the stem.
        layout: ``auto`` (per row), ``searchr1`` or ``flashrag``.
        limit: keep only the first ``limit`` examples.
    """
    p = Path(path)
    rows = read_rows(p)
    if limit is not None:
        rows = rows[:limit]
    if data_source is None:
        generic = {"train", "test", "dev", "val", "validation"}
        data_source = p.parent.name if p.stem in generic and p.parent.name else p.stem
    examples = examples_from_rows(rows, source=p, data_source=data_source, layout=layout)
    seen: dict[str, int] = {}
    for i, ex in enumerate(examples):
        if ex.uid in seen:
            raise DataError(f"{_where(p, i)}: duplicate uid {ex.uid!r} (also row {seen[ex.uid]})")
        seen[ex.uid] = i
    return examples


# --------------------------------------------------------------------------------------------
# conversion


def to_searchr1_row(ex: QAExample, *, split: str | None = None) -> dict[str, Any]:
    """The Search-R1 row for an example (as written by Search-R1's ``nq_search.py``)."""
    extra = {"index": ex.index, "split": split if split is not None else ex.split}
    extra.update(ex.extra)
    return {
        "id": ex.id,
        "question": ex.question,
        "golden_answers": list(ex.aliases),
        "data_source": ex.data_source,
        "prompt": [{"role": "user", "content": prompt_text(ex.question)}],
        "ability": "fact-reasoning",
        "reward_model": {"style": "rule", "ground_truth": {"target": list(ex.aliases)}},
        "extra_info": extra,
    }


def to_flashrag_row(ex: QAExample) -> dict[str, Any]:
    """The FlashRAG row for an example.

    ``data_source``, ``split`` and ``metadata`` (the index and extra fields) are kept so that
    a Search-R1 -> FlashRAG -> Search-R1 round trip gives the same examples.
    """
    row: dict[str, Any] = {"id": ex.id, "question": ex.question,
                           "golden_answers": list(ex.aliases), "data_source": ex.data_source}
    if ex.split:
        row["split"] = ex.split
    row["metadata"] = {"index": ex.index, **ex.extra}
    return row


def convert_file(src: str | os.PathLike, dst: str | os.PathLike, *, to: str,
                 data_source: str | None = None, split: str | None = None) -> int:
    """Convert ``src`` (either layout) into ``dst`` in layout ``to`` (``searchr1``/``flashrag``).

    The output format (JSONL or parquet) follows ``dst``'s suffix.  Returns the row count.
    """
    examples = load_examples(src, data_source=data_source)
    if to == "searchr1":
        rows = [to_searchr1_row(ex, split=split) for ex in examples]
    elif to == "flashrag":
        rows = [to_flashrag_row(ex) for ex in examples]
    else:
        raise ValueError(f"unknown target layout {to!r} (expected searchr1 or flashrag)")
    write_rows(rows, dst)
    return len(rows)
