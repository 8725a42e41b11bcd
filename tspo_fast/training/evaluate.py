"""Evaluation (docs/algorithm.md §6): greedy rollouts on test questions; EM per data source, mean turns,
search calls, and the share of questions whose answer was retrieved at all."""
from __future__ import annotations

import json
import os
from collections import defaultdict
from typing import Any, Dict, List, Optional, Sequence

from ..algo.rewards import score_batch
from ..data import prompt_items


def evaluate(agent, tokenizer, examples: Sequence[Any], *, chat_template: str = "auto", limit: Optional[int] = None,
             batch_prompts: int = 64, folr_source: str = "observation") -> Dict[str, Any]:
    """Greedy (temperature 0, n = 1) rollouts of ``examples`` with ``agent``'s engine."""
    examples = list(examples)[:limit] if limit else list(examples)
    per: Dict[str, Dict[str, List[float]]] = defaultdict(lambda: defaultdict(list))
    for s in range(0, len(examples), batch_prompts):
        chunk = examples[s:s + batch_prompts]
        batch = agent.rollout(prompt_items(chunk, tokenizer, chat_template), n=1, temperature=0.0)
        em, k_star = score_batch(batch, tokenizer, outcome="em", source=folr_source)
        for b, ex in enumerate(chunk):
            d = per[ex.data_source]
            d["em"].append(float(em[b]))
            d["turns"].append(float(batch.num_turns[b]))
            d["searches"].append(float(batch.num_searches[b]))
            d["answer_retrieved"].append(float(k_star[b] >= 0))
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
