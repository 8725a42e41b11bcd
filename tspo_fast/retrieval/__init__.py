"""Search environment: corpus, BM25 and dense indexes, the Search-R1-compatible HTTP server,
and two retrievers with one interface, ``retrieve(queries, topk) -> list[list[hit]]``:

* :class:`InProcessRetriever` searches an index folder in this process;
* :class:`HTTPRetriever` asks a ``retriever serve`` server (or Search-R1's own).

Each hit is ``{"document": {"id": str, "contents": str}, "score": float}``;
:func:`format_docs` writes one query's hits as SPEC §1's ``Doc {i}(Title: ...) ...`` lines.
Heavy modules (torch, faiss, bm25s, fastapi) load only when used.
"""
from tspo_fast.retrieval.base import Hit, Retriever, RetrieverError, format_docs
from tspo_fast.retrieval.client import HTTPRetriever, HTTPRetrieverConfig
from tspo_fast.retrieval.corpus import Corpus, CorpusError, split_title
from tspo_fast.retrieval.index import (IndexError_, IndexMeta, IndexMismatchError, build_index,
                                       load_index)
from tspo_fast.retrieval.inprocess import InProcessRetriever

__all__ = ["Hit", "Retriever", "RetrieverError", "format_docs", "HTTPRetriever",
           "HTTPRetrieverConfig", "Corpus", "CorpusError", "split_title", "IndexError_",
           "IndexMeta", "IndexMismatchError", "build_index", "load_index", "InProcessRetriever"]
