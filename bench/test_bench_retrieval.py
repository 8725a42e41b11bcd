"""Retrieval throughput (queries/second), batched, top-3.

* the bundled world corpus: BM25 (bm25s) and dense (all-MiniLM-L6-v2 query encoding + faiss
  Flat), 64 questions per batch;
* a synthetic 1M-passage corpus of random unit vectors (384-d, vectors only, no encoder),
  drawn around 4096 random cluster centres so that approximate indexes have structure to
  exploit (uniform random vectors are a degenerate worst case for IVF/HNSW recall); queries
  are perturbed corpus vectors.  faiss Flat and IVF (nlist 1024, nprobe 16) on 1M; HNSW
  (M 32) on 100k, because building HNSW over 1M vectors on 2 cores takes too long for a
  benchmark run.  Recall@3 of IVF/HNSW against Flat is printed.  faiss runs with
  :func:`tune_faiss_cpu` (BLAS for batched exhaustive search), as the retriever does.

Run:  python -m pytest bench/test_bench_retrieval.py -q -s
Memory stays under ~3.5 GB (one 1M x 384 float32 index, 1.5 GB, at a time).
"""
from __future__ import annotations

import time

import numpy as np
import pytest

from tspo_fast.data import load_examples
from tspo_fast.retrieval import InProcessRetriever, build_index
from tspo_fast.retrieval.index import make_faiss_index, tune_faiss_cpu
from tspo_fast.world import corpus_path, qa_path

BATCH = 64
DIM = 384
N_BIG = 1_000_000
N_HNSW = 100_000
N_CENTRES = 4096

tune_faiss_cpu()


def _qps(benchmark, n_queries: int, label: str) -> None:
    mean = benchmark.stats.stats.mean
    qps = n_queries / mean
    benchmark.extra_info["qps"] = round(qps, 1)
    print(f"\n[{label}] batch {n_queries}: {mean * 1e3:.2f} ms/batch, {qps:,.0f} queries/s")


@pytest.fixture(scope="module")
def questions():
    return [e.question for e in load_examples(qa_path("test"))][:BATCH]


@pytest.fixture(scope="module", params=["bm25", "dense"])
def world(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"world_{request.param}")
    build_index(corpus_path(), request.param, out, progress=False)
    return request.param, InProcessRetriever.from_dir(out)


def test_world_corpus(benchmark, world, questions):
    kind, retriever = world
    retriever.retrieve(questions, 3)  # warm-up
    benchmark.pedantic(retriever.retrieve, args=(questions, 3), rounds=5 if kind == "dense" else 30,
                       iterations=1, warmup_rounds=1)
    _qps(benchmark, len(questions), f"world corpus ({retriever.index.meta.corpus_size} passages), {kind}")


def _centres() -> np.ndarray:
    c = np.random.default_rng(0).standard_normal((N_CENTRES, DIM), dtype=np.float32)
    return c / np.linalg.norm(c, axis=1, keepdims=True)


def _unit_vectors(n: int, seed: int, chunk: int = 100_000, spread: float = 0.7):
    """Clustered random unit vectors, chunk by chunk (the same numbers on every call)."""
    rng = np.random.default_rng(seed)
    centres = _centres()
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        v = centres[rng.integers(0, N_CENTRES, m)]
        v += rng.standard_normal((m, DIM), dtype=np.float32) * np.float32(spread / np.sqrt(DIM))
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        yield v


def _queries(seed: int) -> np.ndarray:
    """Corpus vectors (the first ones of seed ``seed``) with a little noise."""
    q = next(_unit_vectors(BATCH, seed)).copy()
    q += np.random.default_rng(99).standard_normal(q.shape, dtype=np.float32) * np.float32(0.3 / np.sqrt(DIM))
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def _recall(rows: np.ndarray, truth: np.ndarray) -> str:
    r1 = np.mean(rows[:, 0] == truth[:, 0])
    r3 = np.mean([len(set(a) & set(b)) / 3 for a, b in zip(rows, truth)])
    return f"recall@1 {r1:.3f}, recall@3 {r3:.3f}"


@pytest.fixture(scope="module")
def flat_truth():
    """Exact top-3 rows of the 1M corpus for the benchmark queries (filled by the Flat test)."""
    return {}


def test_synthetic_1m_flat(benchmark, flat_truth):
    t0 = time.perf_counter()
    index = make_faiss_index(DIM, "flat")
    for v in _unit_vectors(N_BIG, seed=1):
        index.add(v)
    print(f"\nflat build (1M x {DIM}): {time.perf_counter() - t0:.1f} s")
    q = _queries(1)
    _, flat_truth["1m"] = index.search(q, 3)
    benchmark.pedantic(index.search, args=(q, 3), rounds=5, iterations=1, warmup_rounds=1)
    _qps(benchmark, BATCH, "synthetic 1M, faiss Flat IP")
    del index


def test_synthetic_1m_ivf(benchmark, flat_truth):
    t0 = time.perf_counter()
    index = make_faiss_index(DIM, "ivf", nlist=1024)
    gen = _unit_vectors(N_BIG, seed=1)
    first = next(gen)
    index.train(first[:60_000])
    index.add(first)
    for v in gen:
        index.add(v)
    index.nprobe = 16
    print(f"\nIVF build (1M x {DIM}, nlist 1024, train 60k): {time.perf_counter() - t0:.1f} s")
    q = _queries(1)
    _, rows = index.search(q, 3)
    if "1m" in flat_truth:
        print(f"IVF nprobe 16 vs Flat: {_recall(rows, flat_truth['1m'])}")
    benchmark.pedantic(index.search, args=(q, 3), rounds=10, iterations=1, warmup_rounds=1)
    _qps(benchmark, BATCH, "synthetic 1M, faiss IVF1024 nprobe 16")
    del index


def test_synthetic_100k_hnsw(benchmark):
    vecs = np.concatenate(list(_unit_vectors(N_HNSW, seed=2)))
    t0 = time.perf_counter()
    index = make_faiss_index(DIM, "hnsw", hnsw_m=32, ef_construction=40)
    index.add(vecs)
    print(f"\nHNSW build (100k x {DIM}, M 32, efConstruction 40): {time.perf_counter() - t0:.1f} s")
    index.hnsw.efSearch = 64
    q = _queries(2)
    flat = make_faiss_index(DIM, "flat")
    flat.add(vecs)
    _, truth = flat.search(q, 3)
    _, rows = index.search(q, 3)
    print(f"HNSW efSearch 64 vs Flat: {_recall(rows, truth)}")
    benchmark.pedantic(index.search, args=(q, 3), rounds=20, iterations=1, warmup_rounds=1)
    _qps(benchmark, BATCH, "synthetic 100k, faiss HNSW32 efSearch 64")
