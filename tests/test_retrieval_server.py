"""The Search-R1-compatible HTTP server and client, on loopback with real uvicorn servers:
HTTP equals in-process, bad requests get 4xx, a load test, a down and a slow server."""
from __future__ import annotations

import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from _procs import free_port
from _world import world_index_dir

from tspo_fast.data import load_examples
from tspo_fast.protocol import format_docs, search_observation
from tspo_fast.retrieval import HTTPRetriever, InProcessRetriever, RetrievalError
from tspo_fast.retrieval.server import BackgroundServer, ServerLimits, create_app
from tspo_fast.world import corpus_path, qa_path

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def questions():
    return [e.question for e in load_examples(qa_path("test"))[:40]]


@pytest.fixture(scope="module", params=["bm25", "dense"])
def served(request, tmp_path_factory):
    """(in-process retriever, running server) per index kind."""
    retriever = InProcessRetriever.from_dir(world_index_dir(tmp_path_factory, request.param))
    limits = ServerLimits(max_queries=64, max_topk=100, max_body_bytes=64 * 1024)
    with BackgroundServer(create_app(retriever, limits)) as server:
        yield retriever, server


def test_http_equals_in_process(served, questions):
    retriever, server = served
    with HTTPRetriever(server.url, timeout_s=30, retries=0) as client:
        for topk in (1, 3, 7):
            remote = client.retrieve(questions, topk)
            local = retriever.retrieve(questions, topk)
            assert [[h["document"] for h in hits] for hits in remote] == \
                   [[h["document"] for h in hits] for hits in local]
            assert [[h["score"] for h in hits] for hits in remote] == \
                   [[h["score"] for h in hits] for hits in local]
            assert [format_docs(h) for h in remote] == [format_docs(h) for h in local]
        assert client.health()["kind"] == retriever.kind


def test_wire_format_is_search_r1s(served, questions):
    retriever, server = served
    body = {"queries": questions[:2], "topk": 3, "return_scores": True}
    data = httpx.post(server.url + "/retrieve", json=body).json()
    assert set(data) == {"result"} and len(data["result"]) == 2
    hit = data["result"][0][0]
    assert set(hit) == {"document", "score"} and set(hit["document"]) == {"id", "contents"}
    # without scores (Search-R1's default): per query a list of documents
    for body in ({"queries": questions[:2], "topk": 3, "return_scores": False},
                 {"queries": questions[:2], "topk": 3}):
        data = httpx.post(server.url + "/retrieve", json=body).json()
        assert [[d for d in docs] for docs in data["result"]] == \
               [[h["document"] for h in hits] for hits in retriever.retrieve(questions[:2], 3)]
    # no topk: the server's default (3)
    data = httpx.post(server.url + "/retrieve", json={"queries": questions[2:3]}).json()
    assert len(data["result"][0]) == 3


BAD_REQUESTS = [
    ({"queries": [], "topk": 3}, 400, "'queries' is empty"),
    ({"queries": ["a"], "topk": 0}, 400, "'topk' must be >= 1"),
    ({"queries": ["a"], "topk": -2}, 400, "'topk' must be >= 1"),
    ({"queries": ["a"], "topk": 101}, 400, "'topk' must be <= 100"),
    ({"queries": ["a"], "topk": "3"}, 400, "'topk' must be an integer"),
    ({"queries": ["a"], "topk": 2.5}, 400, "'topk' must be an integer"),
    ({"queries": ["a", 7], "topk": 3}, 400, "queries[1] must be a string"),
    ({"queries": "a", "topk": 3}, 400, "'queries' must be a list"),
    ({"queries": [["a"]], "topk": 3}, 400, "queries[0] must be a string"),
    ({"topk": 3}, 400, "missing field 'queries'"),
    ({"queries": ["a"], "return_scores": "yes"}, 400, "'return_scores' must be true or false"),
    ({"queries": ["a"], "top_k": 3}, 400, "unknown field(s): top_k"),
    ([1, 2], 400, "must be a JSON object"),
    ({"queries": ["q"] * 65, "topk": 3}, 413, "too many queries: 65 > 64"),
    ({"queries": ["x" * 70_000], "topk": 3}, 413, "request body too large"),
]


@pytest.mark.parametrize("body, status, message", BAD_REQUESTS,
                         ids=[m for _, _, m in BAD_REQUESTS])
def test_bad_requests_get_4xx_with_message(served, body, status, message):
    _, server = served
    resp = httpx.post(server.url + "/retrieve", json=body)
    assert resp.status_code == status and message in resp.json()["detail"], resp.text
    assert httpx.get(server.url + "/health").json()["status"] == "ok"  # still serving


def test_malformed_bodies(served):
    _, server = served
    r = httpx.post(server.url + "/retrieve", content=b"{not json",
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["detail"]

    def chunks():  # a streamed body without Content-Length, over the limit
        for _ in range(80):
            yield b"x" * 1024

    r = httpx.post(server.url + "/retrieve", content=chunks())
    assert r.status_code == 413 and "too large" in r.json()["detail"]
    for body in (b"[" * 20_000 + b"]" * 20_000,                                # deeper than the parser's
                 b'{"queries": ' + b"[" * 20_000 + b"]" * 20_000 + b"}"):       # recursion limit: 400, not 500
        r = httpx.post(server.url + "/retrieve", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400 and "nested too deeply" in r.json()["detail"], r.text
    r = httpx.post(server.url + "/retrieve", content=b'{"queries": ["caf\xe9"]}', headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["detail"]
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    with HTTPRetriever(server.url, retries=3, backoff_s=0.01) as client:  # 4xx: no retries
        with pytest.raises(RetrievalError, match="rejected the request: HTTP 400.*'topk' must be <= 100"):
            client.search(["a"], 500)


def test_blank_queries_get_an_explicit_empty_result(served, questions):
    _, server = served
    data = httpx.post(server.url + "/retrieve", json={"queries": ["", "  ", questions[0]], "topk": 3,
                                                      "return_scores": True}).json()
    assert data["result"][0] == [] and data["result"][1] == [] and len(data["result"][2]) == 3
    with HTTPRetriever(server.url, retries=0) as client:
        assert client.retrieve([" \t"], 3) == [[]]


@pytest.mark.slow
def test_cli_build_serve_and_load(tmp_path, questions):
    """`index build` and `retriever serve` through the CLI, then 64 clients x 50 requests."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    out = tmp_path / "bm25"
    subprocess.run([sys.executable, "-m", "tspo_fast.cli", "index", "build",
                    "--corpus", str(corpus_path()), "--kind", "bm25", "--out", str(out)],
                   check=True, env=env, timeout=120, capture_output=True)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tspo_fast.cli", "retriever", "serve",
                             "--index", str(out), "--host", "127.0.0.1", "--port", str(port),
                             "--log-level", "warning"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.1)

        n_clients, n_requests = 64, 50
        client = HTTPRetriever(url, timeout_s=30, retries=0)
        expected = client.retrieve(questions[:4], 3)
        latencies: list[float] = []
        errors: list[str] = []
        lock = threading.Lock()

        def worker(c: int) -> None:
            mine = []
            for r in range(n_requests):
                qs = [questions[(c + r + j) % len(questions)] for j in range(4)]
                t0 = time.perf_counter()
                try:
                    res = client.retrieve(qs, 3)
                    assert len(res) == 4 and all(len(h) == 3 for h in res)
                except Exception as e:  # counted, reported below
                    with lock:
                        errors.append(repr(e))
                mine.append(time.perf_counter() - t0)
            with lock:
                latencies.extend(mine)

        t0 = time.perf_counter()
        with ThreadPoolExecutor(n_clients) as pool:
            list(pool.map(worker, range(n_clients)))
        wall = time.perf_counter() - t0
        lat = sorted(latencies)
        p50, p99 = statistics.median(lat), lat[int(0.99 * (len(lat) - 1))]
        print(f"\nload test (BM25, 4 queries/request): {len(lat)} requests from {n_clients} "
              f"clients in {wall:.1f} s = {len(lat) / wall:.0f} req/s; p50 {p50 * 1e3:.1f} ms, "
              f"p99 {p99 * 1e3:.1f} ms; errors {len(errors)}")
        assert not errors, errors[:3]
        assert len(lat) == n_clients * n_requests
        assert wall < 120
        assert client.retrieve(questions[:4], 3) == expected
        client.close()
    finally:
        proc.terminate()
        proc.wait(10)


def test_down_server_raises_quickly():
    port = free_port()  # nothing listens there
    client = HTTPRetriever(f"http://127.0.0.1:{port}", timeout_s=2, retries=2, backoff_s=0.05)
    t0 = time.monotonic()
    with pytest.raises(RetrievalError) as err:
        client.retrieve(["anything"], 3)
    elapsed = time.monotonic() - t0
    msg = str(err.value)
    assert f"127.0.0.1:{port}/retrieve" in msg and "after 3 attempt(s)" in msg and "ConnectError" in msg
    assert elapsed < 2.0, elapsed
    client.close()


def _slow_and_flaky_app():
    """A tiny app: /retrieve sleeps (slow server); /flaky fails twice with 503 then answers."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    app = FastAPI()
    calls = {"n": 0}

    @app.post("/retrieve")
    async def slow(body: dict):
        await asyncio.sleep(1.5)
        return {"result": [[] for _ in body["queries"]]}

    @app.post("/flaky/retrieve")
    async def flaky(body: dict):
        calls["n"] += 1
        if calls["n"] <= 2:
            return JSONResponse(status_code=503, content={"detail": "warming up"})
        doc = {"id": "1", "contents": '"T"\ntext'}
        return {"result": [[{"document": doc, "score": 1.5}] for _ in body["queries"]]}

    return app, calls


def test_slow_server_times_out_then_errors_and_5xx_is_retried():
    app, calls = _slow_and_flaky_app()
    with BackgroundServer(app) as server:
        client = HTTPRetriever(server.url, timeout_s=0.3, retries=1, backoff_s=0.05)
        t0 = time.monotonic()
        with pytest.raises(RetrievalError, match=r"failed after 2 attempt\(s\): timed out after 0.3 s"):
            client.retrieve(["q"], 3)
        assert time.monotonic() - t0 < 1.4  # two 0.3 s attempts, not the 1.5 s answer
        client.close()

        flaky = HTTPRetriever(server.url + "/flaky", timeout_s=2, retries=3, backoff_s=0.01)
        assert flaky.retrieve(["a", "b"], 1) == [[{"document": {"id": "1", "contents": '"T"\ntext'},
                                                  "score": 1.5}]] * 2
        assert calls["n"] == 3
        calls["n"] = 0
        stubborn = HTTPRetriever(server.url + "/flaky/retrieve", timeout_s=2, retries=1, backoff_s=0.01)
        with pytest.raises(RetrievalError, match=r"after 2 attempt\(s\): HTTP 503: warming up"):
            stubborn.retrieve(["a"], 1)


def test_one_call_makes_at_most_retries_plus_one_posts():
    """One retry layer: a rollout's retrieval over HTTP that keeps failing makes exactly
    retries + 1 POSTs and raises one RetrievalError naming the turn and the query."""
    from _tiny import ScriptedEngine

    from tspo_fast.config import RolloutConfig
    from tspo_fast.data import PromptItem
    from tspo_fast.env.agent import SearchAgent
    from tspo_fast.models.tiny import build_tiny_model, load_tokenizer

    app, calls = _slow_and_flaky_app()
    with BackgroundServer(app) as server, tempfile.TemporaryDirectory() as d:
        tok = load_tokenizer(build_tiny_model(os.path.join(d, "m")))
        calls["n"] = -100                        # the flaky endpoint keeps answering 503
        client = HTTPRetriever(server.url + "/flaky", timeout_s=2, retries=2, backoff_s=0.01)
        eng = ScriptedEngine(tok, lambda ctx, turn: "<search> capital of Ruritania </search>")
        agent = SearchAgent(eng, client, tok, RolloutConfig(n=1, max_turns=2))
        with pytest.raises(RetrievalError, match=r"turn 0 for queries \['capital of Ruritania'\].*after 3 attempt"):
            agent.rollout([PromptItem(tok("Question: q\n", add_special_tokens=False)["input_ids"], uid="u")])
        assert calls["n"] == -100 + 3
        client.close()


def test_retriever_query_prints_what_a_rollout_appends(served, questions):
    """``tspo-fast retriever query`` shows exactly the observation text training appends."""
    _, server = served
    url = server.url
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-m", "tspo_fast.cli", "retriever", "query", "--url", url,
                          questions[0]], check=True, env=env, timeout=120, capture_output=True, text=True).stdout
    with HTTPRetriever(url, timeout_s=30, retries=0) as client:
        hits = client.retrieve([questions[0]], 3)[0]
    assert out == f"# {questions[0]}\n" + search_observation(hits)
    retriever, _ = served
    if retriever.kind == "bm25":                  # no word in the vocabulary: no passage, and it says so
        out = subprocess.run([sys.executable, "-m", "tspo_fast.cli", "retriever", "query", "--url", url, "what is the"],
                             check=True, env=env, timeout=120, capture_output=True, text=True).stdout
        assert out == "# what is the\n# no passage matches this query\n" + search_observation([])


@pytest.mark.parametrize("options, message", [
    (["--topk", "0"], "--topk: must be an integer >= 1, got 0"),
    (["--max-topk", "-5"], "--max-topk: must be an integer >= 1, got -5"),
    (["--topk", "5", "--max-topk", "3"], "--topk: 5 is over max_topk 3: every request without a topk would be refused"),
    (["--max-queries", "0"], "--max-queries: must be an integer >= 1, got 0"),
    (["--max-body-bytes", "-1"], "--max-body-bytes: must be an integer >= 1, got -1"),
    (["--port", "70000"], "--port: must be in [1, 65535], got 70000"),
])
def test_serve_options_are_checked_before_anything_starts(tmp_path, capsys, options, message):
    from tspo_fast.cli import main

    # the index does not exist: an option that passed would end in an error about the index instead
    assert main(["retriever", "serve", "--index", str(tmp_path / "no-index"), *options]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"tspo-fast retriever: error: {message}"


def test_a_port_in_use_is_the_last_line_naming_the_option(tmp_path, capsys):
    from tspo_fast.cli import main

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["retriever", "serve", "--index", str(tmp_path / "no-index"), "--port", str(port)]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"tspo-fast retriever: error: --port {port}: cannot listen on 127.0.0.1:{port}: the address is already in "
        "use (another server listens there; stop it or pick another --port)")
    with pytest.raises(ValueError, match="max_topk: must be an integer >= 1, got 0"):      # the library's check
        ServerLimits(max_topk=0)
