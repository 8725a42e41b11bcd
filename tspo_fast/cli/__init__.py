"""The ``tspo-fast`` command: one subcommand per job, each a module of this package with a
``main(argv)``, imported when its subcommand runs (``tspo-fast demo`` does not load DeepSpeed).

An error ends the command with one line on stderr, ``tspo-fast <command>: error: <message>``
(the message names the field, file or row), and exit status 1; ``--debug`` anywhere on the
command line shows the traceback instead.  Stdout carries the command's own output: third-party
output goes to stderr (DeepSpeed's log, its op builds), and DeepSpeed's notice that it found no GPU
is dropped, unless ``--debug``."""
from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import sys
from typing import Iterator, List, Optional

#: subcommand -> (module, help)
COMMANDS = {
    "train": ("tspo_fast.cli.train", "train a policy (TSPO or GRPO) from a YAML config"),
    "eval": ("tspo_fast.cli.eval", "greedy evaluation: EM per data source, turns, searches"),
    "compare": ("tspo_fast.cli.compare", "train configs over several seeds; paired table and PNG of test EM"),
    "plot": ("tspo_fast.cli.plot", "draw reward/EM curves of runs to a PNG"),
    "plan": ("tspo_fast.cli.plan", "per-rank GPU memory budget of a config; fails naming the fields to change"),
    "demo": ("tspo_fast.cli.demo", "FOLR rewards and TSPO vs GRPO advantages on one group of rollouts"),
    "agreement": ("tspo_fast.cli.agreement", "measure K1 (token ids) vs the string rule of FOLR"),
    "index": ("tspo_fast.cli.retrieval", "build retrieval indexes (BM25, dense)"),
    "retriever": ("tspo_fast.cli.retrieval", "serve or query a retrieval index"),
}


def _not_a_notice(record: logging.LogRecord) -> bool:
    """DeepSpeed's "Setting accelerator to CPU" notice (every command, every machine without a GPU): dropped."""
    return not record.getMessage().startswith("Setting accelerator to CPU")


class _Stderr:
    """A stream that writes to whatever ``sys.stderr`` is at the time of the write."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


@contextlib.contextmanager
def third_party_output(debug: bool = False) -> Iterator[None]:
    """Around the import of a command's modules: DeepSpeed's logger, which writes to the stdout it
    finds when it is imported, gets stderr, without its no-GPU notice; ``debug``: left as it is."""
    if debug:
        yield
        return
    logging.getLogger("DeepSpeed").addFilter(_not_a_notice)
    with contextlib.redirect_stdout(_Stderr()):
        yield


def one_line(e: BaseException) -> str:
    """An exception as the one line the CLI prints: its message (first line, plus a count of the
    lines left out), prefixed by its type when the message does not name a field, file or row."""
    text = str(e).strip() or type(e).__name__
    lines = text.splitlines()
    head = lines[0] + (f" (+{len(lines) - 1} more line(s); --debug shows all)" if len(lines) > 1 else "")
    known = ("ConfigError", "DataError", "CheckpointError", "DivergenceError", "FileNotFoundError",
             "IndexMismatchError", "RetrievalError", "RunLockError", "BuildLockError", "CorpusError", "RetrievalIndexError",
             "PlotError")
    return head if type(e).__name__ in known else f"{type(e).__name__}: {head}"


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if debug or not argv or argv[0].startswith("-"):
        return _dispatch(argv, debug)
    try:
        return _dispatch(argv, debug)
    except KeyboardInterrupt:
        print(f"tspo-fast {argv[0]}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # every error: one line; --debug for the traceback
        print(f"tspo-fast {argv[0]}: error: {one_line(e)}", file=sys.stderr)
        return 1


def _dispatch(argv: List[str], debug: bool = False) -> int:
    parser = argparse.ArgumentParser(prog="tspo-fast",
                                     description="TSPO training, retrieval and kernels for search-augmented RL")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, text) in COMMANDS.items():
        sub.add_parser(name, help=text, add_help=False)
    args, rest = parser.parse_known_args(argv[:1])
    with third_party_output(debug):
        module = importlib.import_module(COMMANDS[args.command][0])
    if args.command in ("index", "retriever"):      # one module, two command groups
        return module.main(argv) or 0
    return module.main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
