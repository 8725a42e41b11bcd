"""Evaluation (docs/algorithm.md §6): greedy rollouts on test questions; EM per data source, mean turns,
search calls, and the share of questions whose answer was retrieved at all.

With several ranks (torch.distributed initialised, world size > 1) the questions are sharded:
rank r rolls out questions r, r + world, r + 2 world, ... and the per-question results are
gathered on every rank, so each rank generates 1/world of the test set and every rank returns
the same result as a world of one (same questions, same order of the sums).  Every rank must
call :func:`evaluate` (the gather is a collective).
"""
from __future__ import annotations

import json
import os
from collections import defaultdict
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..algo.rewards import score_batch
from ..data import prompt_items
from .distributed import all_gather_objects, rank, world_size

#: one question's result: (index in the evaluated list, data source, em, turns, searches, answer retrieved)
Record = Tuple[int, str, float, float, float, float]


def _rollout_records(agent, tokenizer, examples: Sequence[Any], indices: Sequence[int], *, chat_template: str,
                     batch_prompts: int, folr_source: str) -> List[Record]:
    """Greedy rollouts of ``examples[i] for i in indices``, ``batch_prompts`` questions per call."""
    out: List[Record] = []
    for s in range(0, len(indices), batch_prompts):
        idx = list(indices[s:s + batch_prompts])
        chunk = [examples[i] for i in idx]
        batch = agent.rollout(prompt_items(chunk, tokenizer, chat_template), n=1, temperature=0.0)
        em, k_star = score_batch(batch, tokenizer, outcome="em", source=folr_source)
        for b, (i, ex) in enumerate(zip(idx, chunk)):
            out.append((i, ex.data_source, float(em[b]), float(batch.num_turns[b]), float(batch.num_searches[b]),
                        float(k_star[b] >= 0)))
    return out


def evaluate(agent, tokenizer, examples: Sequence[Any], *, chat_template: str = "auto", limit: Optional[int] = None,
             batch_prompts: int = 64, folr_source: str = "observation") -> Dict[str, Any]:
    """Greedy (temperature 0, n = 1) rollouts of ``examples`` with ``agent``'s engine, this rank's
    share of them when there are several ranks (collective; see the module docstring)."""
    examples = list(examples)[:limit] if limit else list(examples)
    r, world = rank(), world_size()
    mine = _rollout_records(agent, tokenizer, examples, range(r, len(examples), world), chat_template=chat_template,
                            batch_prompts=batch_prompts, folr_source=folr_source)
    records = sorted(rec for part in all_gather_objects(mine) for rec in part)
    if [rec[0] for rec in records] != list(range(len(examples))):
        raise RuntimeError(f"evaluation: the gathered results cover {len(records)} of {len(examples)} questions")
    per: Dict[str, Dict[str, List[float]]] = defaultdict(lambda: defaultdict(list))
    for _, source, em, turns, searches, retrieved in records:
        d = per[source]
        d["em"].append(em)
        d["turns"].append(turns)
        d["searches"].append(searches)
        d["answer_retrieved"].append(retrieved)
    mean = lambda xs: sum(xs) / len(xs) if xs else 0.0
    by_source = {src: {k: mean(v) for k, v in d.items()} | {"n": len(d["em"])} for src, d in sorted(per.items())}
    allv = defaultdict(list)
    for d in per.values():
        for k, v in d.items():
            allv[k] += v
    overall = {k: mean(v) for k, v in allv.items()} | {"n": len(allv["em"])}
    return {"overall": overall, "by_source": by_source}


def format_table(result: Dict[str, Any]) -> str:
    rows = [("data source", "n", "EM", "turns", "searches", "answer retrieved")]
    for src, d in list(result["by_source"].items()) + [("overall", result["overall"])]:
        rows.append((src, str(d["n"]), f"{d.get('em', 0):.3f}", f"{d.get('turns', 0):.2f}", f"{d.get('searches', 0):.2f}",
                     f"{d.get('answer_retrieved', 0):.3f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)


def write_result(result: Dict[str, Any], path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
