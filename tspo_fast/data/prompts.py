"""Rollout inputs: a question's prompt token ids and what rewards need later."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Sequence

from .qa import QAExample, build_prompt

__all__ = ["PromptItem", "prompt_items"]


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
