"""The in-process retriever: an index plus its corpus, behind :class:`~.base.Retriever`."""
from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any, Sequence

from .base import Hit, check_request
from .bundled import resolve_index
from .corpus import Corpus
from .encoder import Encoder
from .index import BM25Index, DenseIndex, IndexMismatchError, check_corpus, load_index, read_meta

__all__ = ["InProcessRetriever", "from_config"]


class InProcessRetriever:
    """Search an index in this process; the same results as the HTTP server over it.

    Searches are serialised with a lock (the encoder and BM25 scorer are run one batch at a
    time; torch and faiss use their own threads inside a batch).  The corpus must be the one the
    index was built on (its fingerprint in ``meta.json``; :func:`~.index.check_corpus`).  A query
    that is empty or only whitespace gets no documents (an empty hit list), never arbitrary ones.
    """

    def __init__(self, index: BM25Index | DenseIndex, corpus: Corpus):
        check_corpus(index.meta, corpus, getattr(index, "folder", None))
        self.index = index
        self.corpus = corpus
        self._lock = threading.Lock()

    @classmethod
    def from_dir(cls, index_dir: str | os.PathLike, corpus: str | os.PathLike | Corpus | None = None,
                 *, encoder: str | Encoder | None = None, device: str = "cpu"
                 ) -> "InProcessRetriever":
        """Load the index in ``index_dir`` and its corpus (``corpus`` or the recorded path); a dense
        index is searched on ``device`` (``tspo_fast.retrieval.index.FAISS_DEVICES``, default the CPU)."""
        d = Path(index_dir)
        if corpus is None:
            meta = read_meta(d)
            if not meta.corpus_path:
                raise IndexMismatchError(f"{d}: no corpus path recorded; pass the corpus")
            corpus = Path(meta.corpus_path)
            if not corpus.is_absolute():
                corpus = d / corpus
        corp = corpus if isinstance(corpus, Corpus) else Corpus.load(corpus)
        return cls(load_index(d, encoder=encoder, device=device), corp)

    @property
    def kind(self) -> str:
        return self.index.meta.kind

    def info(self) -> dict[str, Any]:
        """Index facts for ``/health``."""
        m = self.index.meta
        return {"kind": m.kind, "corpus_size": m.corpus_size, "encoder": m.encoder or None,
                "dim": m.dim or None, "faiss": m.faiss or None}

    def search(self, queries: Sequence[str], topk: int) -> tuple[list[list[dict]], list[list[float]]]:
        """Documents and scores per query (Search-R1's ``batch_search`` with scores); a blank
        query gets none."""
        queries = list(queries)
        asked = [i for i, q in enumerate(queries) if q.strip()]
        docs_out: list[list[dict]] = [[] for _ in queries]
        scores_out: list[list[float]] = [[] for _ in queries]
        if not asked:
            return docs_out, scores_out
        with self._lock:
            scores, rows = self.index.search([queries[i] for i in asked], topk)
        for i, srow, rrow in zip(asked, scores.tolist(), rows.tolist()):
            keep = [(s, r) for s, r in zip(srow, rrow) if r >= 0]  # faiss pads with -1
            docs_out[i] = self.corpus.docs([r for _, r in keep])
            scores_out[i] = [float(s) for s, _ in keep]
        return docs_out, scores_out

    def retrieve(self, queries: list[str], topk: int) -> list[list[Hit]]:
        """Top ``topk`` hits per query: ``{"document": {"id", "contents"}, "score"}``.

        An empty query list gives ``[]`` (as :class:`HTTPRetriever` does, without a request).
        """
        if isinstance(queries, (list, tuple)) and len(queries) == 0:
            return []
        check_request(queries, topk)
        docs, scores = self.search(queries, topk)
        return [[{"document": d, "score": s} for d, s in zip(ds, ss)] for ds, ss in zip(docs, scores)]


def from_config(cfg) -> InProcessRetriever:
    """``retrieval.kind: inprocess``: the index folder ``retrieval.index`` (or ``bundled:bm25``)."""
    return InProcessRetriever.from_dir(resolve_index(cfg.index))
