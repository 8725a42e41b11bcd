"""Rewards (docs/algorithm.md §2): outcome EM/F1 on the last <answer>, and FOLR's
first-occurrence turn.

The string rules here are the reference; the trainer computes the first-occurrence turn on
token ids with kernel K1 (:func:`first_turns`), whose agreement with
:func:`first_occurrence_turn_text` is measured in ``tspo_fast.algo.agreement``.
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Any, Optional, Sequence, Tuple

import torch

from tspo_kernels import FOLR_SOURCES, alias_list, first_occurrence_of_aliases, normalize_answer

__all__ = [
    "OUTCOMES", "FOLR_SOURCES", "normalize_answer", "extract_answer", "exact_match", "f1", "outcome_reward",
    "first_occurrence_turn_text", "first_turns", "score_batch",
]

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def extract_answer(text: Optional[str]) -> Optional[str]:
    """The stripped content of the LAST ``<answer>...</answer>`` in ``text``; None if none.

    Apply it to the generated response (not prompt + response: Search-R1's prompt holds an
    example answer, which is why its own extractor skips the first match).
    """
    if not text:
        return None
    matches = _ANSWER.findall(text)
    return matches[-1].strip() if matches else None


def exact_match(prediction: Optional[str], aliases: Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised alias, else 0.0 (None -> 0.0)."""
    if prediction is None:
        return 0.0
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(a) for a in alias_list(aliases)))


def f1(prediction: Optional[str], aliases: Sequence[str]) -> float:
    """SQuAD token F1 of the normalised prediction, best over aliases, in [0, 1]."""
    if prediction is None:
        return 0.0
    pred = normalize_answer(prediction).split()
    best = 0.0
    for alias in alias_list(aliases):
        gold = normalize_answer(alias).split()
        common = sum((Counter(pred) & Counter(gold)).values())
        if common == 0:
            continue
        precision, recall = common / len(pred), common / len(gold)
        best = max(best, 2 * precision * recall / (precision + recall))
    return best


#: ``reward.outcome``: the score of an answer against the gold aliases
OUTCOMES = {"em": exact_match, "f1": f1}


def _outcome_fn(kind: str):
    if kind not in OUTCOMES:
        raise ValueError(f"unknown reward.outcome {kind!r}; expected one of {', '.join(map(repr, OUTCOMES))}")
    return OUTCOMES[kind]


def outcome_reward(response: Optional[str], aliases: Sequence[str], kind: str = "em") -> float:
    """R_i: EM (``kind="em"``) or F1 (``"f1"``) of the last <answer> in ``response``."""
    return _outcome_fn(kind)(extract_answer(response), aliases)


def first_occurrence_turn_text(observation_texts: Sequence[Optional[str]], aliases: Sequence[str], *,
                               action_texts: Optional[Sequence[Optional[str]]] = None,
                               source: str = "observation") -> int:
    """FOLR's string rule: the first turn k whose segment contains a gold alias, else -1.

    ``observation_texts[k]`` is turn k's observation (None/"" if the turn had none) and
    ``action_texts[k]`` its action.  A segment contains an alias when the normalised alias is
    a substring of the normalised segment text.  ``source``: "observation" (default),
    "action" or "any" (the first turn where either holds).  Aliases that normalise to ""
    are ignored.
    """
    if source not in FOLR_SOURCES:
        raise ValueError(f"unknown reward.folr_source {source!r}; expected one of {FOLR_SOURCES}")
    if source != "observation" and action_texts is None:
        raise ValueError(f"source={source!r} needs action_texts")
    gold = [g for g in (normalize_answer(a) for a in alias_list(aliases)) if g]
    n = max(len(observation_texts), len(action_texts or []))
    for k in range(n):
        segments = []
        if source in ("action", "any") and k < len(action_texts):
            segments.append(action_texts[k])
        if source in ("observation", "any") and k < len(observation_texts):
            segments.append(observation_texts[k])
        for text in segments:
            if text:
                norm = normalize_answer(text)
                if any(g in norm for g in gold):
                    return k
    return -1


def first_turns(token_ids: torch.Tensor, turn_id: torch.Tensor, is_obs: torch.Tensor,
                aliases: Sequence[Sequence[str]], tokenizer: Any, *, source: str = "observation",
                backend: str = "auto") -> Tuple[torch.Tensor, torch.Tensor]:
    """FOLR's first-occurrence turn on token ids (K1): ``(turn, pos)`` int64 (B,), -1 if none.

    ``aliases[b]`` are row b's gold answers; their token spellings come from
    :func:`tspo_kernels.answer_variants` with ``tokenizer``.
    """
    return first_occurrence_of_aliases(token_ids, turn_id, is_obs, aliases, tokenizer, source, backend=backend)


def score_batch(batch, tokenizer: Any, *, outcome: str = "em", source: str = "observation",
                backend: str = "auto") -> Tuple[torch.Tensor, torch.Tensor]:
    """Rewards of a ``RolloutBatch``: ``(outcome R (B,) float32, first turn k* (B,) int64)``.

    R scores ``batch.answer_text`` against ``batch.aliases``; k* comes from the token ids
    (K1), never from re-tokenised text.
    """
    score = _outcome_fn(outcome)
    R = torch.tensor([score(a, g) for a, g in zip(batch.answer_text, batch.aliases)], dtype=torch.float32)
    k_star, _ = first_turns(batch.input_ids, batch.turn_id, batch.is_obs, batch.aliases, tokenizer,
                            source=source, backend=backend)
    return R.to(batch.input_ids.device), k_star
