"""Search environment: corpus, BM25 and dense indexes, the Search-R1-compatible HTTP server,
and retrievers with one interface, ``retrieve(queries, topk) -> list[list[hit]]``:

* :class:`InProcessRetriever` searches an index folder in this process;
* :class:`HTTPRetriever` asks a ``retriever serve`` server (or Search-R1's own);
* :class:`Resilient` puts any other retriever under the retry layer.

Each hit is ``{"document": {"id": str, "contents": str}, "score": float}``; every failure is a
:class:`RetrievalError`.  New kinds register in :data:`RETRIEVERS` (README, "Extending").
"""
from .base import (RETRIEVERS, Hit, Resilient, RetrievalError, Retriever, RetryPolicy, build_retriever,
                   check_request, with_retries)
from .corpus import Corpus, CorpusError, split_title
from .http import HTTPRetriever
from .index import IndexError_, IndexMeta, IndexMismatchError, build_index, load_index
from .inprocess import InProcessRetriever

__all__ = ["RETRIEVERS", "Hit", "Resilient", "RetrievalError", "Retriever", "RetryPolicy", "build_retriever",
           "check_request", "with_retries", "Corpus", "CorpusError", "split_title", "HTTPRetriever",
           "IndexError_", "IndexMeta", "IndexMismatchError", "build_index", "load_index", "InProcessRetriever"]
