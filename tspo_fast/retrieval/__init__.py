"""Search environment: corpus, BM25 and dense indexes, the Search-R1-compatible HTTP server,
and retrievers with one interface, ``retrieve(queries, topk) -> list[list[hit]]``:

* :class:`InProcessRetriever` searches an index folder in this process;
* :class:`HTTPRetriever` asks a ``retriever serve`` server (or Search-R1's own);
* :class:`Resilient` puts any other retriever under the retry layer.

Each hit is ``{"document": {"id": str, "contents": str}, "score": float}``; every failure is a
:class:`RetrievalError`.  New kinds register in :data:`RETRIEVERS` (docs/extending.md).

The interface (``base``) loads with this package; the implementations (pyarrow, bm25s, httpx,
faiss behind them) load when first named (PEP 562), so that code which only needs the
interface — the config, the kernels' users, ``tspo-fast plan`` — does not pay for them.
"""
import importlib

from .base import (
    RETRIEVERS,
    Hit,
    Resilient,
    RetrievalError,
    Retriever,
    RetryPolicy,
    build_retriever,
    check_request,
    with_retries,
)

_LAZY = {"Corpus": "corpus", "CorpusError": "corpus", "split_title": "corpus", "HTTPRetriever": "http",
         "RetrievalIndexError": "index", "IndexMeta": "index", "IndexMismatchError": "index", "build_index": "index",
         "load_index": "index", "InProcessRetriever": "inprocess"}

__all__ = ["RETRIEVERS", "Hit", "Resilient", "RetrievalError", "Retriever", "RetryPolicy", "build_retriever",
           "check_request", "with_retries", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
