"""The retriever interface the rollout uses, shared by the in-process and HTTP retrievers.

``retriever.retrieve(queries, topk)`` returns, per query, a best-first list of hits in
Search-R1's JSON shape ``{"document": {"id": str, "contents": str}, "score": float}``.
:func:`format_docs` turns one query's hits into the observation text of SPEC §1.
"""
from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

from tspo_fast.retrieval.corpus import split_title

__all__ = ["Hit", "Retriever", "RetrieverError", "format_docs", "check_request"]

#: one retrieved passage: ``{"document": {"id": str, "contents": str}, "score": float}``
Hit = dict


class RetrieverError(RuntimeError):
    """Retrieval failed (server down, slow, or answering with an error)."""


@runtime_checkable
class Retriever(Protocol):
    """Anything with Search-R1's batched retrieve."""

    def retrieve(self, queries: list[str], topk: int) -> list[list[Hit]]:
        """Top ``topk`` hits for each query, best first (one batch for all queries)."""
        ...


def check_request(queries: Sequence[object], topk: object, *, max_queries: int | None = None,
                  max_topk: int | None = None, max_query_chars: int | None = None) -> None:
    """Raise ``ValueError`` with a readable message for a malformed retrieval request."""
    if not isinstance(queries, (list, tuple)):
        raise ValueError(f"'queries' must be a list of strings, got {type(queries).__name__}")
    if len(queries) == 0:
        raise ValueError("'queries' is empty: send at least one query")
    if max_queries is not None and len(queries) > max_queries:
        raise ValueError(f"too many queries: {len(queries)} > {max_queries} per request")
    for i, q in enumerate(queries):
        if not isinstance(q, str):
            raise ValueError(f"queries[{i}] must be a string, got {type(q).__name__}")
        if max_query_chars is not None and len(q) > max_query_chars:
            raise ValueError(f"queries[{i}] is {len(q)} characters long (max {max_query_chars})")
    if isinstance(topk, bool) or not isinstance(topk, int):
        raise ValueError(f"'topk' must be an integer, got {type(topk).__name__}")
    if topk <= 0:
        raise ValueError(f"'topk' must be >= 1, got {topk}")
    if max_topk is not None and topk > max_topk:
        raise ValueError(f"'topk' must be <= {max_topk}, got {topk}")


def format_docs(hits: Sequence[Hit]) -> str:
    """SPEC §1 observation text for one query: ``Doc {i}(Title: {title}) {text}\\n`` per hit.

    ``i`` counts from 1; the title is the first line of ``contents`` without its surrounding
    double quotes, the text the rest.  Accepts hits (``{"document": ...}``) or bare documents.
    """
    lines = []
    for i, hit in enumerate(hits, start=1):
        doc = hit.get("document", hit)
        title, text = split_title(doc["contents"])
        lines.append(f"Doc {i}(Title: {title}) {text}\n")
    return "".join(lines)
