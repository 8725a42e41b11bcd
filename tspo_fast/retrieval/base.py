"""The retriever interface, its one error type and its one retry layer, and the registry of
retriever kinds (``retrieval.kind`` in a config).

``retriever.retrieve(queries, topk)`` returns, per query, a best-first list of hits in
Search-R1's JSON shape ``{"document": {"id": str, "contents": str}, "score": float}``.  How hits
become the text a rollout appends is :func:`tspo_fast.protocol.search_observation`.

Failures: every retrieval failure the rollout sees is a :class:`RetrievalError`.  Retries and
per-attempt time limits live here, in :func:`with_retries` (one loop, driven by a
:class:`RetryPolicy`): the HTTP client runs each POST through it (httpx enforces the per-attempt
timeout), and :class:`Resilient` puts any other retriever under it (a thread enforces the
timeout).  So one ``retrieve`` call makes at most ``retries + 1`` attempts.
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Protocol, Sequence, TypeVar, runtime_checkable

from ..registry import Registry

__all__ = ["Hit", "Retriever", "RetrievalError", "RetryPolicy", "with_retries", "Resilient",
           "check_request", "check_result", "RETRIEVERS", "build_retriever"]

#: one retrieved passage: ``{"document": {"id": str, "contents": str}, "score": float}``
Hit = dict
T = TypeVar("T")


class RetrievalError(RuntimeError):
    """Retrieval failed: server down, slow, answering with an error, or a malformed answer.

    ``retryable`` is False for errors another attempt cannot fix (a request the server rejects).
    """

    def __init__(self, message: str, *, retryable: bool = True, attempts: int = 0):
        super().__init__(message)
        self.retryable = retryable
        self.attempts = attempts


@runtime_checkable
class Retriever(Protocol):
    """Anything with Search-R1's batched retrieve."""

    def retrieve(self, queries: List[str], topk: int) -> List[List[Hit]]:
        """Top ``topk`` hits for each query, best first (one batch for all queries)."""
        ...


@dataclass(frozen=True)
class RetryPolicy:
    """How one ``retrieve`` call may fail before it raises :class:`RetrievalError`.

    timeout_s: wall-clock limit of one attempt (None: no limit).
    retries: extra attempts after the first, on retryable errors.
    backoff_s: wait before the first retry; doubled each retry, capped at ``max_backoff_s``.
    """

    timeout_s: Optional[float] = 30.0
    retries: int = 2
    backoff_s: float = 0.25
    max_backoff_s: float = 4.0

    def __post_init__(self) -> None:
        if self.retries < 0:
            raise ValueError(f"RetryPolicy.retries must be >= 0, got {self.retries}")
        if self.timeout_s is not None and not self.timeout_s > 0:
            raise ValueError(f"RetryPolicy.timeout_s must be > 0 or None, got {self.timeout_s}")
        if self.backoff_s < 0 or self.max_backoff_s < 0:
            raise ValueError("RetryPolicy backoff times must be >= 0")

    @classmethod
    def from_config(cls, cfg) -> "RetryPolicy":
        """From a ``RetrievalConfig`` (``timeout_s``, ``retries``, ``backoff_s``)."""
        return cls(timeout_s=cfg.timeout_s, retries=cfg.retries, backoff_s=cfg.backoff_s)


def _describe(e: BaseException) -> str:
    return str(e) if isinstance(e, RetrievalError) else f"{type(e).__name__}: {e}"


def with_retries(attempt: Callable[[], T], policy: RetryPolicy, what: str) -> T:
    """Run ``attempt()`` up to ``policy.retries + 1`` times; return its first result.

    Any exception counts as a failed attempt, except a :class:`RetrievalError` with
    ``retryable=False``, which is raised at once.  After the last attempt a
    :class:`RetrievalError` says ``what`` failed, after how many attempts, and the last cause.
    """
    attempts = policy.retries + 1
    last: Optional[BaseException] = None
    for a in range(attempts):
        if a:
            time.sleep(min(policy.backoff_s * 2 ** (a - 1), policy.max_backoff_s))
        try:
            return attempt()
        except RetrievalError as e:
            if not e.retryable:
                raise
            last = e
        except Exception as e:  # reported below, with its type
            last = e
    raise RetrievalError(f"{what} failed after {attempts} attempt(s): {_describe(last)}",
                         attempts=attempts) from last


def call_with_timeout(fn: Callable[[], T], timeout_s: Optional[float]) -> T:
    """``fn()`` in a daemon thread; ``TimeoutError`` after ``timeout_s`` seconds.

    For retrievers that have no time limit of their own: a call that never returns leaves its
    daemon thread behind, and the caller moves on.
    """
    if timeout_s is None:
        return fn()
    box: queue.Queue = queue.Queue(maxsize=1)

    def run():
        try:
            box.put((True, fn()))
        except BaseException as e:  # re-raised in the caller
            box.put((False, e))

    threading.Thread(target=run, daemon=True, name="tspo-retrieve").start()
    try:
        ok, value = box.get(timeout=timeout_s)
    except queue.Empty:
        raise TimeoutError(f"retriever did not answer within {timeout_s:g} s") from None
    if ok:
        return value
    raise value


def check_result(result: object, n_queries: int) -> List[List[Hit]]:
    """A retriever's answer must be a list with one hit list per query."""
    if not isinstance(result, list) or len(result) != n_queries:
        size = len(result) if hasattr(result, "__len__") else "?"
        raise RetrievalError(f"retriever returned {type(result).__name__} of length {size} for {n_queries} queries")
    return result


class Resilient:
    """Any retriever under the retry layer: each attempt capped at ``policy.timeout_s`` (in a
    thread) and checked (one hit list per query); failures retried by :func:`with_retries`."""

    def __init__(self, retriever: Retriever, policy: RetryPolicy = RetryPolicy()):
        self.retriever = retriever
        self.policy = policy

    def retrieve(self, queries: List[str], topk: int) -> List[List[Hit]]:
        queries = list(queries)
        return with_retries(
            lambda: check_result(call_with_timeout(lambda: self.retriever.retrieve(queries, topk),
                                                   self.policy.timeout_s), len(queries)),
            self.policy, "retrieval")

    def __getattr__(self, name):          # info(), health(), close() of the wrapped retriever
        return getattr(self.retriever, name)


def check_request(queries: Sequence[object], topk: object, *, max_queries: int | None = None,
                  max_topk: int | None = None, max_query_chars: int | None = None) -> None:
    """Raise ``ValueError`` with a readable message for a malformed retrieval request."""
    if not isinstance(queries, (list, tuple)):
        raise ValueError(f"'queries' must be a list of strings, got {type(queries).__name__}")
    if len(queries) == 0:
        raise ValueError("'queries' is empty: send at least one query")
    if max_queries is not None and len(queries) > max_queries:
        raise ValueError(f"too many queries: {len(queries)} > {max_queries} per request")
    for i, q in enumerate(queries):
        if not isinstance(q, str):
            raise ValueError(f"queries[{i}] must be a string, got {type(q).__name__}")
        if max_query_chars is not None and len(q) > max_query_chars:
            raise ValueError(f"queries[{i}] is {len(q)} characters long (max {max_query_chars})")
    if isinstance(topk, bool) or not isinstance(topk, int):
        raise ValueError(f"'topk' must be an integer, got {type(topk).__name__}")
    if topk <= 0:
        raise ValueError(f"'topk' must be >= 1, got {topk}")
    if max_topk is not None and topk > max_topk:
        raise ValueError(f"'topk' must be <= {max_topk}, got {topk}")


#: ``retrieval.kind`` -> factory ``fn(cfg: RetrievalConfig) -> Retriever`` (the section: ``index``, ``url``,
#: ``topk``, the retry settings and ``options``); the built-ins take no options
RETRIEVERS: Registry[Callable[..., Retriever]] = Registry("retrieval.kind", {
    "inprocess": "tspo_fast.retrieval.inprocess:from_config",
    "http": "tspo_fast.retrieval.http:from_config",
}, role="factory", call=("cfg",), options={"inprocess": (), "http": ()})


def build_retriever(cfg) -> Retriever:
    """The retriever of a ``RetrievalConfig``: ``cfg.kind`` (a registered name or a plugin path)
    called with ``cfg``; what it builds must have ``retrieve(queries, topk)``."""
    RETRIEVERS.check(cfg.kind, cfg.options)
    retriever = RETRIEVERS.get(cfg.kind)(cfg)
    if not callable(getattr(retriever, "retrieve", None)):
        raise TypeError(f"retrieval.kind: {cfg.kind!r} built a {type(retriever).__name__}, which has no "
                        "retrieve(queries, topk) method (the Retriever interface, tspo_fast.retrieval.base)")
    return retriever
