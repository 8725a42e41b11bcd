"""HTTP client for a Search-R1-compatible retrieval server (ours or Search-R1's own)."""
from __future__ import annotations

from typing import Any, List, Optional

import httpx

from .base import Hit, RetrievalError, RetryPolicy, check_request, with_retries

__all__ = ["HTTPRetriever", "from_config"]


class HTTPRetriever:
    """``retrieve(queries, topk)`` over HTTP: one POST per attempt, pooled connections.

    url: server base URL (``http://127.0.0.1:8000``) or the full ``.../retrieve`` URL.
    policy: the retry layer's :class:`RetryPolicy` (``timeout_s``, ``retries``, ``backoff_s``
    override its fields): each attempt is one POST limited by httpx to ``timeout_s`` (connect,
    read, write, pool); connection errors, timeouts, 5xx and 429 are retried with backoff, a
    4xx is not (the request itself is wrong); then :class:`RetrievalError` names the URL, the
    number of attempts and the last error.  Thread-safe (``httpx.Client`` is).
    """

    def __init__(self, url: str = "http://127.0.0.1:8000", *, policy: Optional[RetryPolicy] = None,
                 timeout_s: Optional[float] = None, retries: Optional[int] = None,
                 backoff_s: Optional[float] = None, max_connections: int = 64):
        policy = policy or RetryPolicy()
        over = {k: v for k, v in {"timeout_s": timeout_s, "retries": retries, "backoff_s": backoff_s}.items()
                if v is not None}
        if over:
            policy = RetryPolicy(**{**policy.__dict__, **over})
        if policy.timeout_s is None:
            raise ValueError("HTTPRetriever needs a finite timeout_s")
        self.policy = policy
        base = url.rstrip("/")
        if base.endswith("/retrieve"):
            base = base[: -len("/retrieve")]
        self.base_url = base
        self.retrieve_url = base + "/retrieve"
        self._client = httpx.Client(
            timeout=httpx.Timeout(policy.timeout_s),
            # idle connections are dropped after 4 s, before uvicorn's default 5 s keep-alive
            # closes them from the server side (reusing one then fails mid-request)
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections,
                                keepalive_expiry=4.0),
        )

    def _post_once(self, payload: dict) -> Any:
        try:
            resp = self._client.post(self.retrieve_url, json=payload)
        except httpx.TimeoutException as e:
            raise RetrievalError(f"timed out after {self.policy.timeout_s:g} s ({type(e).__name__})") from e
        except httpx.TransportError as e:
            raise RetrievalError(f"{type(e).__name__}: {e}") from e
        if resp.status_code >= 500 or resp.status_code == 429:
            raise RetrievalError(f"HTTP {resp.status_code}: {_detail(resp)}")
        if resp.status_code >= 400:  # the request itself is wrong: retrying cannot help
            raise RetrievalError(f"retrieval server at {self.retrieve_url} rejected the request: "
                                 f"HTTP {resp.status_code}: {_detail(resp)}", retryable=False)
        try:
            return resp.json()
        except ValueError as e:
            raise RetrievalError(f"response is not JSON: {e}") from e

    def search(self, queries: List[str], topk: int, return_scores: bool = True) -> List[List[Any]]:
        """The raw ``result`` list of the server's answer."""
        payload = {"queries": list(queries), "topk": topk, "return_scores": return_scores}
        data = with_retries(lambda: self._post_once(payload), self.policy, f"retrieval at {self.retrieve_url}")
        result = data.get("result") if isinstance(data, dict) else None
        if not isinstance(result, list) or len(result) != len(queries):
            raise RetrievalError(f"retrieval server at {self.retrieve_url} answered with a "
                                 f"malformed body (expected 'result' with {len(queries)} lists)", retryable=False)
        return result

    def retrieve(self, queries: List[str], topk: int) -> List[List[Hit]]:
        """Top ``topk`` hits per query, ``{"document": {"id", "contents"}, "score"}``."""
        if len(queries) == 0:
            return []
        try:
            check_request(queries, topk)
        except ValueError as e:
            raise RetrievalError(str(e), retryable=False) from None
        out = []
        for hits in self.search(queries, topk, return_scores=True):
            row = []
            for h in hits:
                doc = h.get("document", {}) if isinstance(h, dict) else {}
                if "contents" not in doc:
                    raise RetrievalError(f"retrieval server at {self.retrieve_url} returned a hit "
                                         f"without document contents: {str(h)[:200]}", retryable=False)
                row.append({"document": {"id": str(doc.get("id", "")), "contents": doc["contents"]},
                            "score": float(h.get("score", 0.0))})
            out.append(row)
        return out

    def health(self) -> dict:
        """``GET /health`` (one attempt); raises :class:`RetrievalError` when unreachable."""
        try:
            resp = self._client.get(self.base_url + "/health")
            resp.raise_for_status()
            return resp.json()
        except (httpx.HTTPError, ValueError) as e:
            raise RetrievalError(f"retrieval server at {self.base_url} is not healthy: {e}") from e

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


def from_config(cfg) -> HTTPRetriever:
    """``retrieval.kind: http``: the server at ``retrieval.url`` under the config's retry policy."""
    return HTTPRetriever(cfg.url, policy=RetryPolicy.from_config(cfg))
