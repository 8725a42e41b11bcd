"""Rollout inputs: a question's prompt token ids and what rewards need later; the prompt-length
check every run applies to its questions when it starts (``data.max_prompt_tokens``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Sequence, Tuple

from ..protocol import build_prompt
from .qa import DataError, QAExample

__all__ = ["PromptItem", "prompt_items", "drop_long_prompts"]


@dataclass
class PromptItem:
    """One question: its already-built prompt ids and what rewards need later."""

    prompt_ids: list[int]
    uid: Any
    aliases: list[str] = field(default_factory=list)
    data_source: str = ""


def prompt_items(examples: Sequence[QAExample], tokenizer: Any, chat_template: str = "auto") -> List[PromptItem]:
    """Prompt token ids of ``examples`` (the chat template applied when the tokenizer has one and
    ``chat_template`` is "auto")."""
    tok = tokenizer if chat_template == "auto" else None
    items = []
    for ex in examples:
        ids = tokenizer.encode(build_prompt(ex.question, tok), add_special_tokens=False)
        items.append(PromptItem(prompt_ids=ids, uid=ex.uid, aliases=list(ex.aliases), data_source=ex.data_source))
    return items


def drop_long_prompts(examples: Sequence[QAExample], tokenizer: Any, chat_template: str, max_tokens: int, *,
                      policy: str = "skip", what: str = "data") -> Tuple[List[QAExample], str]:
    """``(kept examples, report)``: the examples whose prompt (as :func:`prompt_items` builds it)
    has at most ``max_tokens`` tokens.  ``policy="error"``: an over-long prompt raises
    :class:`DataError` naming its uid; ``"skip"``: it is dropped and counted in ``report`` (empty
    when nothing was dropped).  Dropping every example is an error either way."""
    examples = list(examples)
    lengths = [len(item.prompt_ids) for item in prompt_items(examples, tokenizer, chat_template)]
    long = [(ex, n) for ex, n in zip(examples, lengths) if n > max_tokens]
    if not long:
        return examples, ""
    worst = max(long, key=lambda t: t[1])
    detail = (f"{len(long)} of {len(examples)} {what} question(s) have a prompt longer than "
              f"data.max_prompt_tokens={max_tokens} tokens (first: uid {long[0][0].uid!r}, {long[0][1]} tokens; "
              f"longest: uid {worst[0].uid!r}, {worst[1]} tokens)")
    if policy == "error" or len(long) == len(examples):
        raise DataError(f"{detail}; raise data.max_prompt_tokens"
                        + (", or set data.overlong_prompts: skip" if policy == "error" else ""))
    kept = [ex for ex, n in zip(examples, lengths) if n <= max_tokens]
    return kept, f"skipped {detail} (data.overlong_prompts: skip)"
