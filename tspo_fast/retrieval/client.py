"""HTTP client for a Search-R1-compatible retrieval server (ours or Search-R1's own)."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from tspo_fast.retrieval.base import Hit, RetrieverError, check_request

__all__ = ["HTTPRetriever", "HTTPRetrieverConfig"]


@dataclass(frozen=True)
class HTTPRetrieverConfig:
    """Client settings.

    Attributes:
        url: server base URL (``http://127.0.0.1:8000``) or the full ``.../retrieve`` URL.
        timeout_s: per-attempt timeout (connect, read, write, pool).
        retries: extra attempts after the first on connection errors, timeouts and 5xx/429.
        backoff_s: wait before the first retry; doubles each retry, capped at ``max_backoff_s``.
        max_connections: connection pool size (one pooled client serves all threads).
    """

    url: str = "http://127.0.0.1:8000"
    timeout_s: float = 30.0
    retries: int = 3
    backoff_s: float = 0.25
    max_backoff_s: float = 4.0
    max_connections: int = 64


class HTTPRetriever:
    """``retrieve(queries, topk)`` over HTTP: one POST per call, pooled connections, bounded
    retries with exponential backoff, then :class:`RetrieverError` naming the URL, the number
    of attempts and the last error.  Thread-safe (``httpx.Client`` is)."""

    def __init__(self, url: str | None = None, *, timeout_s: float | None = None,
                 retries: int | None = None, backoff_s: float | None = None,
                 config: HTTPRetrieverConfig | None = None):
        import httpx

        cfg = config or HTTPRetrieverConfig()
        over = {k: v for k, v in {"url": url, "timeout_s": timeout_s, "retries": retries,
                                  "backoff_s": backoff_s}.items() if v is not None}
        if over:
            cfg = HTTPRetrieverConfig(**{**cfg.__dict__, **over})
        if cfg.retries < 0 or cfg.timeout_s <= 0:
            raise ValueError(f"need retries >= 0 and timeout_s > 0, got {cfg.retries}, {cfg.timeout_s}")
        self.config = cfg
        base = cfg.url.rstrip("/")
        if base.endswith("/retrieve"):
            base = base[: -len("/retrieve")]
        self.base_url = base
        self.retrieve_url = base + "/retrieve"
        self._client = httpx.Client(
            timeout=httpx.Timeout(cfg.timeout_s),
            # idle connections are dropped after 4 s, before uvicorn's default 5 s keep-alive
            # closes them from the server side (reusing one then fails mid-request)
            limits=httpx.Limits(max_connections=cfg.max_connections,
                                max_keepalive_connections=cfg.max_connections,
                                keepalive_expiry=4.0),
        )

    def _post(self, payload: dict) -> Any:
        import httpx

        cfg = self.config
        attempts = cfg.retries + 1
        last = "no attempt made"
        for attempt in range(attempts):
            if attempt:
                time.sleep(min(cfg.backoff_s * 2 ** (attempt - 1), cfg.max_backoff_s))
            try:
                resp = self._client.post(self.retrieve_url, json=payload)
            except httpx.TimeoutException as e:
                last = f"timed out after {cfg.timeout_s:g} s ({type(e).__name__})"
                continue
            except httpx.TransportError as e:
                last = f"{type(e).__name__}: {e}"
                continue
            if resp.status_code >= 500 or resp.status_code == 429:
                last = f"HTTP {resp.status_code}: {_detail(resp)}"
                continue
            if resp.status_code >= 400:  # the request itself is wrong: retrying cannot help
                raise RetrieverError(f"retrieval server at {self.retrieve_url} rejected the "
                                     f"request: HTTP {resp.status_code}: {_detail(resp)}")
            try:
                return resp.json()
            except ValueError as e:
                last = f"response is not JSON: {e}"
                continue
        raise RetrieverError(f"retrieval at {self.retrieve_url} failed after {attempts} "
                             f"attempt(s): {last}")

    def search(self, queries: list[str], topk: int, return_scores: bool = True) -> list[list[Any]]:
        """The raw ``result`` list of the server's answer."""
        data = self._post({"queries": list(queries), "topk": topk, "return_scores": return_scores})
        result = data.get("result") if isinstance(data, dict) else None
        if not isinstance(result, list) or len(result) != len(queries):
            raise RetrieverError(f"retrieval server at {self.retrieve_url} answered with a "
                                 f"malformed body (expected 'result' with {len(queries)} lists)")
        return result

    def retrieve(self, queries: list[str], topk: int) -> list[list[Hit]]:
        """Top ``topk`` hits per query, ``{"document": {"id", "contents"}, "score"}``."""
        if len(queries) == 0:
            return []
        try:
            check_request(queries, topk)
        except ValueError as e:
            raise RetrieverError(str(e)) from None
        result = self.search(queries, topk, return_scores=True)
        out = []
        for hits in result:
            row = []
            for h in hits:
                doc = h.get("document", {}) if isinstance(h, dict) else {}
                if "contents" not in doc:
                    raise RetrieverError(f"retrieval server at {self.retrieve_url} returned a hit "
                                         f"without document contents: {str(h)[:200]}")
                row.append({"document": {"id": str(doc.get("id", "")), "contents": doc["contents"]},
                            "score": float(h.get("score", 0.0))})
            out.append(row)
        return out

    def health(self) -> dict:
        """``GET /health`` (one attempt); raises :class:`RetrieverError` when unreachable."""
        import httpx

        try:
            resp = self._client.get(self.base_url + "/health")
            resp.raise_for_status()
            return resp.json()
        except (httpx.HTTPError, ValueError) as e:
            raise RetrieverError(f"retrieval server at {self.base_url} is not healthy: {e}") from e

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> "HTTPRetriever":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _detail(resp: Any) -> str:
    try:
        body = resp.json()
        if isinstance(body, dict) and "detail" in body:
            return str(body["detail"])
    except ValueError:
        pass
    return resp.text[:300]
