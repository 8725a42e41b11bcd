"""The embedded world's ceiling: the test EM of a policy that always searches right and reads every
retrieved answer (``python -m tspo_fast.worldgen.ceiling``).

For each question the oracle searches the title of every passage that holds its evidence, hop by
hop (``extra_info.support``), with the bundled BM25 index and the rollout's ``topk`` (3), and
counts the question answered when a gold alias appears in what those searches returned
(docs/algorithm.md §2's string rule on the observations).  What no policy can beat, given the
retriever: a trained policy below it has room to learn.
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from typing import Dict

from ..algo.rewards import first_occurrence_turn_text
from ..data import load_examples
from ..protocol import search_observation
from ..retrieval.bundled import bundled_index
from ..retrieval.corpus import Corpus, split_title
from ..retrieval.inprocess import InProcessRetriever
from ..world import corpus_path, qa_path

__all__ = ["oracle_ceiling"]


def oracle_ceiling(split: str = "test", topk: int = 3, limit: int = 0) -> Dict[str, float]:
    """EM of the oracle on ``split`` (first ``limit`` questions; 0: all), overall and per data source."""
    examples = load_examples(qa_path(split))
    examples = examples[:limit] if limit else examples
    corpus = Corpus.load(corpus_path())
    titles = {d["id"]: split_title(d["contents"])[0] for d in corpus.docs(range(len(corpus)))}
    retriever = InProcessRetriever.from_dir(bundled_index("bm25"))
    hits: Dict[str, list] = defaultdict(list)
    for ex in examples:
        queries = [titles[pid] for pid in ex.extra["support"]]
        observations = [search_observation(h) for h in retriever.retrieve(queries, topk)]
        hits[ex.data_source].append(float(first_occurrence_turn_text(observations, ex.aliases) >= 0))
    every = [x for v in hits.values() for x in v]
    out = {"overall": sum(every) / len(every), "n": len(every)}
    out.update({src: sum(v) / len(v) for src, v in sorted(hits.items())})
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", default="test")
    ap.add_argument("--limit", type=int, default=0)
    args = ap.parse_args(argv)
    print(json.dumps(oracle_ceiling(args.split, limit=args.limit), indent=1))


if __name__ == "__main__":
    main()
