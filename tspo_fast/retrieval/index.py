"""Search indexes over a :class:`~tspo_fast.retrieval.corpus.Corpus`: BM25 (``bm25s``) and dense
(faiss Flat / IVF / HNSW, inner product on unit vectors).

A dense index is searched where :data:`FAISS_DEVICES` says (``device``): on the CPU by default,
so that a retriever next to a training run takes none of its GPU memory; on one named GPU
(``cuda:N``), or sharded over every visible GPU (``all``) when asked.  Its query encoder runs on
the same device (``all``: the first GPU).

An index folder holds the index files and ``meta.json`` (:class:`IndexMeta`: kind, encoder,
dimension, corpus size, corpus fingerprint, format version, ...).  :func:`load_index` checks the
metadata against the encoder it is given, and the in-process retriever checks the corpus it is
given against the fingerprint (:func:`corpus_fingerprint`: passage count, bytes and a SHA-256 of
every id and text, in order), failing with a message saying what differs.

Indexes return corpus *row numbers*; the corpus turns them into documents.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

import bm25s
import numpy as np
import pyarrow as pa
from tqdm import tqdm

from .corpus import Corpus
from .encoder import Encoder, canonical_encoder_name

__all__ = ["FORMAT_VERSION", "IndexMeta", "RetrievalIndexError", "IndexMismatchError", "BM25Index",
           "DenseIndex", "make_faiss_index", "build_index", "load_index", "read_meta", "corpus_fingerprint",
           "check_corpus", "FAISS_DEVICES", "check_faiss_device", "place_faiss_index"]

#: bump when the on-disk layout changes.  2: ``meta.json`` records the corpus fingerprint.
FORMAT_VERSION = 2
#: older versions that still load (with a warning saying what they lack); any other fails
READABLE_VERSIONS = {1: "it records no corpus fingerprint, so a changed corpus cannot be detected"}
_WARNED: set = set()
META_FILE = "meta.json"
FAISS_FILE = "index.faiss"
BM25_DIR = "bm25"
FAISS_KINDS = ("flat", "ivf", "hnsw")
#: where a dense index is searched: "cpu" (the default), "cuda:N" (one GPU, faiss index_cpu_to_gpu)
#: or "all" (sharded over every GPU faiss sees, index_cpu_to_all_gpus; the faiss-gpu package)
FAISS_DEVICES = ("cpu", "cuda:N", "all")


def _faiss():
    """faiss (an optional extra: ``faiss-cpu`` in ``tspo-fast[cpu]``, ``faiss-gpu-cu12`` in ``[gpu]``)."""
    try:
        import faiss
    except ImportError as e:
        raise ImportError("dense retrieval needs faiss: pip install 'tspo-fast[cpu]' (faiss-cpu) "
                          "or 'tspo-fast[gpu]' (faiss-gpu-cu12)") from e
    return faiss


class RetrievalIndexError(RuntimeError):
    """An index folder is missing, unreadable or inconsistent."""


class IndexMismatchError(RetrievalIndexError):
    """The index was built with another encoder, dimension, corpus or format version."""


@dataclass
class IndexMeta:
    """What an index folder holds; saved as ``meta.json`` next to the index files."""

    kind: str  # "bm25" | "dense"
    corpus_size: int
    format_version: int = FORMAT_VERSION
    encoder: str = ""  # canonical encoder name (dense)
    encoder_source: str = ""  # hub name or local folder the encoder was loaded from (dense)
    dim: int = 0  # vector dimension (dense)
    faiss: str = ""  # "flat" | "ivf" | "hnsw" (dense)
    metric: str = ""  # "ip" (dense) | "bm25"
    query_prefix: str = ""
    passage_prefix: str = ""
    corpus_path: str = ""  # where the corpus was read from ("corpus.jsonl" when copied in)
    params: dict = field(default_factory=dict)  # nlist/nprobe/M/efSearch, bm25 k1/b/stopwords
    corpus_fingerprint: dict = field(default_factory=dict)  # corpus_fingerprint() of the corpus indexed

    def save(self, out_dir: Path) -> None:
        (out_dir / META_FILE).write_text(json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")


def read_meta(index_dir: str | os.PathLike) -> IndexMeta:
    """Read and check ``meta.json`` (exists, parses, known kind, this format version)."""
    d = Path(index_dir)
    p = d / META_FILE
    if not p.is_file():
        raise RetrievalIndexError(f"not an index folder: {d} has no {META_FILE} (build one with "
                          f"'index build --corpus ... --kind bm25|dense --out {d}')")
    try:
        raw = json.loads(p.read_text())
    except Exception as e:
        raise RetrievalIndexError(f"{p}: unreadable index metadata: {e}") from e
    version = raw.get("format_version")
    if version in READABLE_VERSIONS and str(d.resolve()) not in _WARNED:
        _WARNED.add(str(d.resolve()))
        warnings.warn(f"{d}: index format version {version}: {READABLE_VERSIONS[version]}; rebuild the index "
                      f"to get version {FORMAT_VERSION}", stacklevel=2)
    elif version != FORMAT_VERSION and version not in READABLE_VERSIONS:
        raise IndexMismatchError(f"{d}: index format version {version} is not a supported version "
                                 f"({', '.join(map(str, sorted([*READABLE_VERSIONS, FORMAT_VERSION])))}); "
                                 "rebuild the index")
    known = {f.name for f in fields(IndexMeta)}
    meta = IndexMeta(**{k: v for k, v in raw.items() if k in known})
    if meta.kind not in ("bm25", "dense"):
        raise RetrievalIndexError(f"{p}: unknown index kind {meta.kind!r}")
    return meta


def _hash_strings(column) -> tuple[str, str, int]:
    """(hash of the values' byte lengths, hash of their bytes, total bytes) of a string column,
    read from the Arrow buffers without copies (the same for any chunking)."""
    lengths, data = hashlib.sha256(), hashlib.sha256()
    total = 0
    for chunk in column.chunks:
        if chunk.type not in (pa.string(), pa.large_string()):
            chunk = chunk.cast(pa.string())
        if len(chunk) == 0:
            continue
        width = np.int64 if chunk.type == pa.large_string() else np.int32
        _, off_buf, data_buf = chunk.buffers()
        offsets = np.frombuffer(off_buf, dtype=width)[chunk.offset:chunk.offset + len(chunk) + 1]
        lengths.update(np.diff(offsets).astype("<i8").tobytes())
        start, end = int(offsets[0]), int(offsets[-1])
        if data_buf is not None and end > start:
            data.update(memoryview(data_buf)[start:end])
        total += end - start
    return lengths.hexdigest(), data.hexdigest(), total


def corpus_fingerprint(corpus: Corpus) -> dict:
    """``{"passages", "bytes", "sha256"}`` of a corpus: its size and a hash of every id and
    contents in row order (independent of the JSON layout of the file; a reordered, edited or
    re-numbered corpus gets another hash).  Reads the Arrow buffers: about 1 s per GB."""
    id_len, id_data, _ = _hash_strings(corpus.ids)
    text_len, text_data, size = _hash_strings(corpus.contents)
    digest = hashlib.sha256(f"{id_len}{id_data}{text_len}{text_data}".encode()).hexdigest()
    return {"passages": len(corpus), "bytes": size, "sha256": digest}


def check_corpus(meta: IndexMeta, corpus: Corpus, index_dir: str | os.PathLike | None = None) -> None:
    """Raise :class:`IndexMismatchError` naming the index folder and both corpora when ``corpus`` is
    not the one the index was built on (passage count, then the fingerprint when recorded)."""
    built = f"{meta.corpus_path or 'a corpus'}" + (f", index folder {index_dir}" if index_dir else "")
    if len(corpus) != meta.corpus_size:
        raise IndexMismatchError(f"corpus {corpus.path or '<memory>'} has {len(corpus)} passages but the index was "
                                 f"built on {meta.corpus_size} ({built})")
    want = meta.corpus_fingerprint
    if not want:
        return
    got = corpus_fingerprint(corpus)
    if got != want:
        raise IndexMismatchError(
            f"corpus {corpus.path or '<memory>'} is not the corpus the index was built on ({built}): "
            f"{got['passages']} passages, {got['bytes']} bytes, sha256 {got['sha256'][:12]} vs "
            f"{want.get('passages')} passages, {want.get('bytes')} bytes, sha256 {str(want.get('sha256'))[:12]} "
            "(reordered or edited since); rebuild the index or pass the original corpus")


# --------------------------------------------------------------------------------------------
# BM25


class BM25Index:
    """BM25 (Lucene variant) over ``contents`` with bm25s; English stopwords, no stemming."""

    def __init__(self, model: Any, meta: IndexMeta):
        self.model = model
        self.meta = meta

    @classmethod
    def build(cls, texts: Sequence[str], k1: float = 0.9, b: float = 0.4,
              stopwords: str = "en", progress: bool = True) -> "BM25Index":
        tokens = bm25s.tokenize(list(texts), stopwords=stopwords, show_progress=progress)
        model = bm25s.BM25(k1=k1, b=b)
        model.index(tokens, show_progress=progress)
        meta = IndexMeta(kind="bm25", corpus_size=len(texts), metric="bm25",
                         params={"k1": k1, "b": b, "stopwords": stopwords})
        return cls(model, meta)

    def save(self, out_dir: Path) -> None:
        self.model.save(str(out_dir / BM25_DIR), show_progress=False)

    @classmethod
    def load(cls, index_dir: Path, meta: IndexMeta) -> "BM25Index":
        d = index_dir / BM25_DIR
        if not d.is_dir():
            raise RetrievalIndexError(f"{index_dir}: BM25 index files ({BM25_DIR}/) are missing")
        return cls(bm25s.BM25.load(str(d), show_progress=False), meta)

    def search(self, queries: Sequence[str], topk: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, rows), each (len(queries), min(topk, corpus size)), best first.  A query that
        shares no term with any passage (stopwords only, punctuation, unknown words: every score 0)
        gets no passage (rows -1), never arbitrary ones.  A query that shares a term with fewer
        than ``topk`` passages keeps the full top ``topk``, the rest at score 0, as the index has
        always answered and as the bundled worlds' warm starts were trained (returning only the
        matching passages changed what those policies read and halved what the embedded default
        learns: test EM 0.37 -> 0.17 at step 8, seed 4)."""
        k = min(topk, self.meta.corpus_size)
        if not queries or k <= 0:
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        tokens = bm25s.tokenize(list(queries), stopwords=self.meta.params.get("stopwords", "en"),
                                return_ids=False, show_progress=False)
        rows, scores = self.model.retrieve(tokens, k=k, show_progress=False, n_threads=0)
        scores, rows = np.asarray(scores, np.float32), np.asarray(rows, np.int64)
        matched = scores.max(axis=1, keepdims=True) > 0 if scores.size else np.zeros((len(queries), 1), bool)
        return scores, np.where(matched, rows, -1)          # BM25 scores a shared term above 0


# --------------------------------------------------------------------------------------------
# dense


def default_nlist(n: int) -> int:
    """IVF list count: ~4 sqrt(n), at most n/39 (faiss wants >= 39 training points a list)."""
    return max(1, min(int(4 * math.sqrt(n)), n // 39, 65536))


def make_faiss_index(dim: int, kind: str = "flat", n: int | None = None, *, nlist: int | None = None,
                     hnsw_m: int = 32, ef_construction: int = 80) -> Any:
    """An empty inner-product faiss index of the given kind (IVF needs ``train`` before ``add``)."""
    faiss = _faiss()
    if kind == "flat":
        return faiss.IndexFlatIP(dim)
    if kind == "ivf":
        nlist = nlist or default_nlist(n or 0)
        quantizer = faiss.IndexFlatIP(dim)
        # faiss's Python wrapper keeps a reference to the quantizer inside the index
        return faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = ef_construction
        return index
    raise ValueError(f"unknown faiss index kind {kind!r} (expected one of {FAISS_KINDS})")


def tune_faiss_cpu(query_bs: int = 256, database_bs: int = 32768, blas_threshold: int = 20) -> None:
    """Let faiss use BLAS for exhaustive search of batches of >= ``blas_threshold`` queries.

    faiss-cpu 1.15 defaults to a threshold of 128000 queries (a SIMD loop below it) and
    1024-vector database blocks; for batched retrieval (tens of queries per call) BLAS with
    larger blocks is 3-7x faster on a 2-core AVX2 machine.  The scratch buffer is
    ``query_bs * database_bs`` floats (32 MB by default).  Process-wide faiss setting.
    """
    faiss = _faiss()
    if hasattr(faiss, "cvar") and hasattr(faiss.cvar, "distance_compute_blas_threshold"):
        faiss.cvar.distance_compute_blas_threshold = blas_threshold
        faiss.cvar.distance_compute_blas_query_bs = query_bs
        faiss.cvar.distance_compute_blas_database_bs = database_bs


def set_search_params(index: Any, params: dict) -> None:
    """Apply nprobe (IVF) / efSearch (HNSW) from ``params`` to a faiss index."""
    faiss = _faiss()
    tune_faiss_cpu()
    ivf = faiss.try_extract_index_ivf(index) if hasattr(faiss, "try_extract_index_ivf") else None
    if ivf is not None and "nprobe" in params:
        ivf.nprobe = int(params["nprobe"])
    if isinstance(index, faiss.IndexHNSW) and "ef_search" in params:
        index.hnsw.efSearch = int(params["ef_search"])


def check_faiss_device(device: str, where: str = "device") -> str:
    """``device`` normalised ("cuda" is "cuda:0"), or a ValueError naming ``where``."""
    d = str(device).strip().lower()
    if d == "cuda":
        d = "cuda:0"
    if d in ("cpu", "all") or (d.startswith("cuda:") and d[5:].isdigit()):
        return d
    raise ValueError(f"{where}: must be 'cpu', 'cuda:N' (one GPU) or 'all' (every visible GPU), got {device!r}")


def _encoder_device(device: str) -> str:
    return "cuda:0" if device == "all" else device


def place_faiss_index(index: Any, kind: str, device: str = "cpu") -> Any:
    """``index`` where ``device`` (:data:`FAISS_DEVICES`) says; "cpu" leaves it as it is."""
    device = check_faiss_device(device)
    if device == "cpu":
        return index
    faiss = _faiss()
    n_gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if n_gpus == 0:
        raise RetrievalIndexError(f"device {device!r}: faiss sees no GPU (faiss-cpu installed? the gpu extra brings "
                          "faiss-gpu-cu12); serve on the CPU with --device cpu")
    if kind == "hnsw":
        raise RetrievalIndexError(f"device {device!r}: faiss has no GPU HNSW index; serve this index with --device cpu")
    if device == "all":
        co = faiss.GpuMultipleClonerOptions()
        co.shard = True
        return faiss.index_cpu_to_all_gpus(index, co=co)
    gpu = int(device.split(":")[1])
    if gpu >= n_gpus:
        raise RetrievalIndexError(f"device {device!r}: faiss sees {n_gpus} GPU(s) (cuda:0 to cuda:{n_gpus - 1})")
    res = faiss.StandardGpuResources()
    placed = faiss.index_cpu_to_gpu(res, gpu, index)
    placed.referenced_objects = [res]          # the GPU resources live as long as the index
    return placed


class DenseIndex:
    """A faiss inner-product index plus the encoder that made its vectors."""

    def __init__(self, index: Any, encoder: Encoder | None, meta: IndexMeta):
        self.index = index
        self.encoder = encoder
        self.meta = meta

    @classmethod
    def build(cls, corpus: Corpus, encoder: Encoder, faiss_kind: str = "flat", *,
              chunk: int = 8192, nlist: int | None = None, nprobe: int | None = None,
              hnsw_m: int = 32, ef_search: int = 64, progress: bool = True) -> "DenseIndex":
        """Encode the corpus in chunks (``passage: `` prefix) and add it to a new faiss index."""
        n = len(corpus)
        if faiss_kind not in FAISS_KINDS:
            raise ValueError(f"unknown faiss index kind {faiss_kind!r} (expected one of {FAISS_KINDS})")
        index = make_faiss_index(encoder.dim, faiss_kind, n, nlist=nlist, hnsw_m=hnsw_m)
        params: dict = {}
        if faiss_kind == "ivf":
            params = {"nlist": index.nlist, "nprobe": nprobe or min(index.nlist, 32)}
        elif faiss_kind == "hnsw":
            params = {"M": hnsw_m, "ef_search": ef_search}
        bar = tqdm(total=n, desc=f"dense index ({faiss_kind})", unit="passage", disable=not progress)
        pending: list[np.ndarray] = []
        for s in range(0, n, chunk):
            vecs = encoder.encode_passages(corpus.texts(s, min(n, s + chunk)))
            bar.update(len(vecs))
            if faiss_kind == "ivf" and not index.is_trained:
                # IVF: collect enough vectors to train the coarse quantizer, then add them
                pending.append(vecs)
                if sum(len(v) for v in pending) < min(n, 256 * index.nlist) and s + chunk < n:
                    continue
                vecs, pending = np.concatenate(pending), []
                index.train(vecs)
            index.add(vecs)
        bar.close()
        set_search_params(index, params)
        meta = IndexMeta(kind="dense", corpus_size=n, encoder=encoder.name,
                         encoder_source=encoder.source or encoder.name, dim=encoder.dim,
                         faiss=faiss_kind, metric="ip", query_prefix=encoder.query_prefix,
                         passage_prefix=encoder.passage_prefix, params=params)
        return cls(index, encoder, meta)

    def save(self, out_dir: Path) -> None:
        faiss = _faiss()
        index = self.index
        if hasattr(faiss, "index_gpu_to_cpu") and "Gpu" in type(index).__name__:
            index = faiss.index_gpu_to_cpu(index)
        faiss.write_index(index, str(out_dir / FAISS_FILE))

    @classmethod
    def load(cls, index_dir: Path, meta: IndexMeta, encoder: Encoder | str | None = None,
             device: str = "cpu") -> "DenseIndex":
        """Load the index of ``index_dir`` and place it on ``device`` (:data:`FAISS_DEVICES`; the
        encoder, when loaded here, runs there too)."""
        device = check_faiss_device(device)
        faiss = _faiss()
        if isinstance(encoder, Encoder):
            enc_name = encoder.name
        else:
            enc_name = canonical_encoder_name(encoder) if encoder else meta.encoder
        if enc_name != meta.encoder:
            raise IndexMismatchError(f"{index_dir}: the index was built with encoder "
                                     f"{meta.encoder!r}, not {enc_name!r}")
        p = index_dir / FAISS_FILE
        if not p.is_file():
            raise RetrievalIndexError(f"{index_dir}: dense index file {FAISS_FILE} is missing")
        index = faiss.read_index(str(p))
        if index.d != meta.dim:
            raise IndexMismatchError(f"{p}: vectors have dimension {index.d} but {META_FILE} "
                                     f"says {meta.dim}")
        if index.ntotal != meta.corpus_size:
            raise IndexMismatchError(f"{p}: holds {index.ntotal} vectors but {META_FILE} says "
                                     f"corpus size {meta.corpus_size}")
        if not isinstance(encoder, Encoder):
            encoder = Encoder.load(encoder or meta.encoder_source or meta.encoder,
                                   query_prefix=meta.query_prefix,
                                   passage_prefix=meta.passage_prefix, device=_encoder_device(device))
        if encoder.dim != meta.dim:
            raise IndexMismatchError(f"{index_dir}: encoder {encoder.name!r} gives {encoder.dim}-d "
                                     f"vectors but the index holds {meta.dim}-d vectors")
        set_search_params(index, meta.params)
        return cls(place_faiss_index(index, meta.faiss, device), encoder, meta)

    def search_vectors(self, vecs: np.ndarray, topk: int) -> tuple[np.ndarray, np.ndarray]:
        k = min(topk, self.meta.corpus_size)
        if len(vecs) == 0 or k <= 0:
            return np.zeros((len(vecs), 0), np.float32), np.zeros((len(vecs), 0), np.int64)
        scores, rows = self.index.search(np.ascontiguousarray(vecs, dtype=np.float32), k)
        return scores, rows.astype(np.int64)

    def search(self, queries: Sequence[str], topk: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, rows), each (len(queries), min(topk, corpus size)); one encoder batch run."""
        if not queries:
            return self.search_vectors(np.zeros((0, self.meta.dim), np.float32), topk)
        return self.search_vectors(self.encoder.encode_queries(list(queries)), topk)


# --------------------------------------------------------------------------------------------
# build / load


def build_index(corpus: str | os.PathLike | Corpus, kind: str, out_dir: str | os.PathLike, *,
                encoder: str | Encoder | None = None, faiss_kind: str = "flat",
                copy_corpus: bool = False, batch_size: int = 64, progress: bool = True,
                **kwargs: Any) -> IndexMeta:
    """Build an index of ``kind`` (``bm25``/``dense``) over ``corpus`` into ``out_dir``.

    ``copy_corpus`` copies the corpus file into the folder (a self-contained index); else the
    corpus path is recorded and ``retriever serve`` reads it from there (or from ``--corpus``).
    Extra keyword arguments go to :meth:`BM25Index.build` / :meth:`DenseIndex.build`.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    corp = corpus if isinstance(corpus, Corpus) else Corpus.load(corpus)
    if len(corp) == 0:
        raise RetrievalIndexError(f"corpus {corp.path or '<memory>'} is empty")
    corp.check_unique_ids()
    if kind == "bm25":
        idx: BM25Index | DenseIndex = BM25Index.build(corp.texts(), progress=progress, **kwargs)
    elif kind == "dense":
        enc = encoder if isinstance(encoder, Encoder) else Encoder.load(encoder, batch_size=batch_size)
        idx = DenseIndex.build(corp, enc, faiss_kind, progress=progress, **kwargs)
    else:
        raise ValueError(f"unknown index kind {kind!r} (expected 'bm25' or 'dense')")
    idx.save(out)
    meta = idx.meta
    meta.corpus_fingerprint = corpus_fingerprint(corp)
    if corp.path:
        if copy_corpus:
            shutil.copyfile(corp.path, out / "corpus.jsonl")
            meta.corpus_path = "corpus.jsonl"
        else:
            meta.corpus_path = str(Path(corp.path).resolve())
    meta.save(out)
    return meta


def load_index(index_dir: str | os.PathLike, *, encoder: str | Encoder | None = None,
               device: str = "cpu") -> BM25Index | DenseIndex:
    """Load an index folder, checking its metadata (see :class:`IndexMismatchError`).

    ``encoder`` (dense only) is the encoder to use; by default the one named in the metadata.
    ``device`` (dense only): where the index is searched, :data:`FAISS_DEVICES` (default the CPU).
    A different encoder name or dimension, or another format version, raises.
    """
    d = Path(index_dir)
    meta = read_meta(d)
    if meta.kind == "bm25":
        if encoder is not None:
            raise IndexMismatchError(f"{d}: a BM25 index takes no encoder (got {encoder!r})")
        idx: BM25Index | DenseIndex = BM25Index.load(d, meta)
    else:
        idx = DenseIndex.load(d, meta, encoder, device)
    idx.folder = d
    return idx
