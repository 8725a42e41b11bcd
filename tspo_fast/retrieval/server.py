"""Search-R1-compatible retrieval HTTP API (FastAPI) and uvicorn runners.

``POST /retrieve`` with ``{"queries": [...], "topk": 3, "return_scores": true}`` answers
``{"result": [[{"document": {"id", "contents"}, "score": s}, ...], ...]}``, or with
``return_scores`` false (Search-R1's default) ``{"result": [[{"id", "contents"}, ...], ...]}``.
All queries of a request are encoded and searched as one batch.  ``GET /health`` reports the
index.  Malformed requests (not JSON, not UTF-8, nested too deeply, wrong fields or types, too
large) get a 4xx JSON ``{"detail": message}``; failures inside the search a 500 with the message;
the server keeps running either way.  A query that is empty or only whitespace gets an empty hit
list (explicitly no documents, as in process), never arbitrary documents.
"""
from __future__ import annotations

import json
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Optional

import uvicorn
from fastapi import FastAPI, Request  # module level: FastAPI resolves the endpoint's annotations here
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from .base import check_request
from .inprocess import InProcessRetriever

__all__ = ["ServerLimits", "ServerLimitError", "create_app", "listen", "serve", "BackgroundServer"]

#: idle keep-alive connections are kept this long (longer than clients keep theirs, so a
#: client never reuses a connection the server is closing at that moment)
KEEP_ALIVE_S = 60


class ServerLimitError(ValueError):
    """A :class:`ServerLimits` field out of range; ``field`` names it."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


@dataclass(frozen=True)
class ServerLimits:
    """Request limits; anything beyond gets a 4xx.  Checked when made (:class:`ServerLimitError`):
    a server whose limits refuse every request never starts."""

    max_queries: int = 1024
    max_topk: int = 100
    max_body_bytes: int = 4 << 20
    max_query_chars: int = 8192
    default_topk: int = 3

    def __post_init__(self) -> None:
        for name in ("max_queries", "max_topk", "max_body_bytes", "max_query_chars", "default_topk"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ServerLimitError(name, f"must be an integer >= 1, got {value!r}")
        if self.default_topk > self.max_topk:
            raise ServerLimitError("default_topk", f"{self.default_topk} is over max_topk {self.max_topk}: every "
                                                   "request without a topk would be refused")


def _error(status: int, message: str):
    return JSONResponse(status_code=status, content={"detail": message})


def create_app(retriever: InProcessRetriever, limits: ServerLimits = ServerLimits()) -> Any:
    """The FastAPI app serving ``retriever``."""
    app = FastAPI(title="tspo-fast retriever", version="1")
    app.state.retriever = retriever
    app.state.limits = limits

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", **retriever.info()}

    @app.post("/retrieve")
    async def retrieve(request: Request):
        declared = request.headers.get("content-length")
        if declared is not None:
            try:
                declared_n = int(declared)
            except ValueError:
                return _error(400, f"bad Content-Length header {declared!r}")
            if declared_n > limits.max_body_bytes:
                return _error(413, f"request body too large: {declared_n} bytes "
                                   f"> {limits.max_body_bytes}")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limits.max_body_bytes:
                return _error(413, f"request body too large: > {limits.max_body_bytes} bytes")
        try:
            payload = json.loads(bytes(body))
        except (ValueError, UnicodeDecodeError) as e:
            return _error(400, f"request body is not valid JSON: {e}")
        except RecursionError:
            return _error(400, "request body is not valid JSON: nested too deeply")
        if not isinstance(payload, dict):
            return _error(400, "request body must be a JSON object with 'queries'")
        if "queries" not in payload:
            return _error(400, "missing field 'queries' (a list of strings)")
        unknown = set(payload) - {"queries", "topk", "return_scores"}
        if unknown:
            return _error(400, f"unknown field(s): {', '.join(sorted(unknown))}")
        queries = payload["queries"]
        topk = payload.get("topk")
        topk = limits.default_topk if topk is None else topk
        return_scores = payload.get("return_scores", False)
        if not isinstance(return_scores, bool):
            return _error(400, f"'return_scores' must be true or false, got {return_scores!r}")
        try:
            check_request(queries, topk, max_queries=limits.max_queries, max_topk=limits.max_topk,
                          max_query_chars=limits.max_query_chars)
        except ValueError as e:
            status = 413 if str(e).startswith("too many queries") else 400
            return _error(status, str(e))
        try:
            docs, scores = await run_in_threadpool(retriever.search, queries, topk)
        except Exception as e:  # keep serving; report what went wrong
            return _error(500, f"retrieval failed: {type(e).__name__}: {e}")
        if return_scores:
            result = [[{"document": d, "score": s} for d, s in zip(ds, ss)]
                      for ds, ss in zip(docs, scores)]
        else:
            result = docs
        return {"result": result}

    return app


def listen(host: str = "127.0.0.1", port: int = 8000) -> socket.socket:
    """A socket bound to ``host:port`` (``SO_REUSEADDR``, as uvicorn binds): an address in use
    fails here, with ``OSError`` (``EADDRINUSE``), before anything else starts."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def serve(retriever: InProcessRetriever, host: str = "127.0.0.1", port: int = 8000,
          limits: ServerLimits = ServerLimits(), log_level: str = "info",
          sock: Optional[socket.socket] = None) -> None:
    """Serve ``retriever`` with uvicorn until interrupted, on ``sock`` (from :func:`listen`;
    default: ``listen(host, port)``)."""
    sock = sock if sock is not None else listen(host, port)
    config = uvicorn.Config(create_app(retriever, limits), host=host, port=sock.getsockname()[1],
                            log_level=log_level, access_log=False, backlog=2048, timeout_keep_alive=KEEP_ALIVE_S)
    uvicorn.Server(config).run(sockets=[sock])


class BackgroundServer:
    """Run an ASGI app with uvicorn in a daemon thread (tests, single-process training).

    The listening socket is bound before the thread starts (``port=0`` picks a free port), so
    :attr:`url` is valid as soon as the constructor returns; :meth:`start` waits until the
    server accepts requests.  Use as a context manager.
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = self.sock.getsockname()[:2]
        config = uvicorn.Config(app, log_level=log_level, access_log=False, backlog=2048,
                                timeout_keep_alive=KEEP_ALIVE_S, timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True, name=f"uvicorn-{self.port}")

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout_s: float = 30.0) -> "BackgroundServer":
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn did not start on {self.url}")
            time.sleep(0.01)
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout_s)
        self.sock.close()

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
