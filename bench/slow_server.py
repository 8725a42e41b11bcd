"""A retrieval server in its own process whose every request is ``delay_ms`` slower (benchmarks).

``python bench/slow_server.py DELAY_MS`` serves BM25 over the bundled world (the app of
``tspo-fast retriever serve``) on a free loopback port, prints its URL on the first line of
stdout, and runs until killed.  A server in its own process, as a deployed search engine is:
one in the benchmark's process would compete with the rollout for the interpreter lock.
"""
from __future__ import annotations

import subprocess
import sys
import threading
import time

import requests

from tspo_fast.retrieval.bundled import bundled_index
from tspo_fast.retrieval.inprocess import InProcessRetriever
from tspo_fast.retrieval.server import BackgroundServer, create_app


class Delayed:
    """A retriever whose every request is ``delay_s`` slower (a slow or remote search engine)."""

    def __init__(self, inner, delay_s: float):
        self.inner, self.delay_s = inner, delay_s

    def search(self, queries, topk):           # what the server's app calls
        time.sleep(self.delay_s)
        return self.inner.search(queries, topk)

    def retrieve(self, queries, topk):         # what the agent calls (in-process use)
        time.sleep(self.delay_s)
        return self.inner.retrieve(queries, topk)

    def info(self):
        return self.inner.info()


class SlowServer:
    """Start ``slow_server.py`` in a subprocess; ``url`` once it answers ``/health``."""

    def __init__(self, delay_ms: float, timeout_s: float = 60.0):
        self.proc = subprocess.Popen([sys.executable, __file__, str(delay_ms)], stdout=subprocess.PIPE, text=True)
        self.url = self.proc.stdout.readline().strip()
        if not self.url.startswith("http"):
            self.close()
            raise RuntimeError(f"slow_server.py did not start (printed {self.url!r})")
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if requests.get(self.url + "/health", timeout=1).ok:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.close()
                raise RuntimeError(f"slow_server.py at {self.url} did not answer /health")
            time.sleep(0.05)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(10)

    def __enter__(self) -> "SlowServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def main(delay_ms: float) -> None:
    inner = InProcessRetriever.from_dir(bundled_index("bm25"))
    with BackgroundServer(create_app(Delayed(inner, delay_ms / 1000.0))) as server:
        print(server.url, flush=True)
        threading.Event().wait()


if __name__ == "__main__":
    main(float(sys.argv[1]))
