"""The episode protocol (docs/algorithm.md §1): tags, how an action is read, and the one
observation format, shared by the rollout, the warm-start builder and ``tspo-fast retriever query``.

An observation is what the environment appends after a turn: for ``<search>q</search>`` the
top passages as ``\\n\\n<information>Doc 1(Title: t) text\\n...</information>\\n\\n``, for
anything else :data:`INVALID_ACTION_OBS`.
"""
from __future__ import annotations

import re
from typing import Optional, Sequence, Tuple

__all__ = ["SEARCH_STOP", "ANSWER_STOP", "STOPS", "INVALID_ACTION_OBS", "format_docs",
           "search_observation", "parse_action"]

SEARCH_STOP = "</search>"
ANSWER_STOP = "</answer>"
#: the strings a turn's generation stops on
STOPS = (SEARCH_STOP, ANSWER_STOP)
INVALID_ACTION_OBS = (
    "\nMy previous action is invalid. If I want to search, I should put the query between "
    "<search> and </search>. If I want to give the final answer, I should put the answer "
    "between <answer> and </answer>. Let me try again.\n"
)
_ACTION_RE = re.compile(r"<(search|answer)>(.*?)</\1>", re.DOTALL)


def format_docs(hits: Sequence[dict]) -> str:
    """One query's passages: ``Doc {i}(Title: {title}) {text}\\n`` per hit, i from 1.

    ``hits`` are retrieval hits ``{"document": {"id", "contents"}, "score"}`` (or bare documents
    ``{"id", "contents"}``).  ``contents`` is wiki-18 layout ``"Title"\\ntext``: the title is the
    first line with its double quotes stripped, the text the remaining lines as they are.
    """
    out = []
    for i, hit in enumerate(hits, start=1):
        contents = hit.get("document", hit)["contents"]
        title, _, text = contents.partition("\n")
        out.append(f"Doc {i}(Title: {title.strip().strip(chr(34))}) {text}\n")
    return "".join(out)


def search_observation(hits: Sequence[dict]) -> str:
    """``\\n\\n<information>{docs}</information>\\n\\n``, the docs stripped as Search-R1 does."""
    return f"\n\n<information>{format_docs(hits).strip()}</information>\n\n"


def parse_action(text: str) -> Tuple[Optional[str], str]:
    """(``"search"`` | ``"answer"`` | None, content stripped) from an action's text.

    The text is first cut after the first ``</search>`` / ``</answer>`` (what the engine stopped
    on); then the first ``<tag>...</tag>`` pair decides, as in Search-R1.
    """
    ends = [(text.find(s) + len(s)) for s in STOPS if s in text]
    if ends:
        text = text[:min(ends)]
    m = _ACTION_RE.search(text)
    if m is None:
        return None, ""
    return m.group(1), m.group(2).strip()
