"""A bundled world's ceiling: the test EM of a policy that always searches right and reads every
retrieved answer (``python -m tspo_fast.worldgen.ceiling [--world hops]``); and, for the hops
world, how well a policy reads once the chain is searched right (``--reading-probe MODEL``).

For each question the oracle searches the title of every passage that holds its evidence, hop by
hop (``extra_info.support``), with the bundled BM25 index and the rollout's ``topk`` (3), and
counts the question answered when a gold alias appears in what those searches returned
(docs/algorithm.md §2's string rule on the observations).  What no policy can beat, given the
retriever: a trained policy below it has room to learn.
"""
from __future__ import annotations

import argparse
import json
import random
from collections import defaultdict
from typing import Dict

import torch

from ..algo.rewards import exact_match, extract_answer, first_occurrence_turn_text
from ..data import load_examples
from ..models import load_causal_lm, load_tokenizer, resolve_model_path
from ..protocol import build_prompt, search_observation
from ..retrieval.bundled import bundled_index
from ..retrieval.corpus import Corpus, split_title
from ..retrieval.inprocess import InProcessRetriever
from ..world import WORLDS, corpus_path, qa_path
from . import hops
from .hops_warmstart import Demonstrator, HopsWarmStartSpec

__all__ = ["oracle_ceiling"]


def oracle_ceiling(split: str = "test", topk: int = 3, limit: int = 0, world: str = "world") -> Dict[str, float]:
    """EM of the oracle on ``split`` (first ``limit`` questions; 0: all), overall and per data source."""
    examples = load_examples(qa_path(split, world))
    examples = examples[:limit] if limit else examples
    corpus = Corpus.load(corpus_path(world))
    titles = {d["id"]: split_title(d["contents"])[0] for d in corpus.docs(range(len(corpus)))}
    retriever = InProcessRetriever.from_dir(bundled_index("bm25", world))
    hits: Dict[str, list] = defaultdict(list)
    for ex in examples:
        queries = [titles[pid] for pid in ex.extra["support"]]
        observations = [search_observation(h) for h in retriever.retrieve(queries, topk)]
        hits[ex.data_source].append(float(first_occurrence_turn_text(observations, ex.aliases) >= 0))
    every = [x for v in hits.values() for x in v]
    out = {"overall": sum(every) / len(every), "n": len(every)}
    out.update({src: sum(v) / len(v) for src, v in sorted(hits.items())})
    return out


def reading_probe(model_path: str, split: str = "test", limit: int = 0, topk: int = 3,
                  max_new_tokens: int = 64, batch_size: int = 32) -> Dict[str, float]:
    """Greedy EM of the policy at ``model_path`` on the hops world's ``split`` when the chain has been
    searched right for it: the context is the prompt and, hop by hop, the search the warm start's
    demonstrations make for the right passage and the observation the real index returns (the
    gold passage is Doc 1); the policy writes the last action.  Overall and per data source."""
    world = hops.build()
    examples = load_examples(qa_path(split, hops.WORLD))
    examples = examples[:limit] if limit else examples
    retriever = InProcessRetriever.from_dir(bundled_index("bm25", hops.WORLD))
    spec = HopsWarmStartSpec(p_continue=1.0, p_bad_query=0.0, p_memory=0.0, swap_share=0.0, topk=topk)
    demo = Demonstrator(world, retriever, spec, random.Random(0))
    tok = load_tokenizer(model_path)
    model = load_causal_lm(model_path, "float32").eval()
    contexts = []
    for ex in examples:
        text = build_prompt(ex.question, tok)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        for action, _, obs in demo.turns(ex)[:-1]:
            ids += tok(action, add_special_tokens=False)["input_ids"]
            ids += tok(obs, add_special_tokens=False)["input_ids"][: spec.max_obs_tokens]
        contexts.append(ids)
    hits: Dict[str, list] = defaultdict(list)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    with torch.no_grad():
        for b in range(0, len(contexts), batch_size):
            chunk = contexts[b:b + batch_size]
            L = max(map(len, chunk))
            ids = torch.tensor([[pad] * (L - len(c)) + c for c in chunk])          # left-padded
            att = torch.tensor([[0] * (L - len(c)) + [1] * len(c) for c in chunk])
            out = model.generate(input_ids=ids, attention_mask=att, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=pad, stop_strings=["</answer>", "</search>"], tokenizer=tok)
            for ex, row in zip(examples[b:b + batch_size], out[:, L:]):
                text = tok.decode(row, skip_special_tokens=True)
                hits[ex.data_source].append(exact_match(extract_answer(text), ex.aliases))
    every = [x for v in hits.values() for x in v]
    res = {"overall": sum(every) / len(every), "n": len(every)}
    res.update({src: sum(v) / len(v) for src, v in sorted(hits.items())})
    return res


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", default="test")
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--world", default="world", choices=sorted(WORLDS))
    ap.add_argument("--reading-probe", metavar="MODEL", default=None,
                    help="hops world: the policy's greedy EM with the chain searched right (a model folder or "
                         "bundled:hops-warmstart) instead of the oracle ceiling")
    args = ap.parse_args(argv)
    if args.reading_probe:
        res = reading_probe(resolve_model_path(args.reading_probe), args.split, limit=args.limit)
    else:
        res = oracle_ceiling(args.split, limit=args.limit, world=args.world)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
