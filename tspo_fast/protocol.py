"""The episode protocol's text (docs/algorithm.md §1), in one place: the prompt the policy sees,
the tags an action is read by, and the observation the environment appends.  Shared by the data
loaders, the rollout, the warm-start builders, the metrics and ``tspo-fast retriever query``.

An observation is what the environment appends after a turn: for ``<search>q</search>`` the
top passages as ``\\n\\n<information>Doc 1(Title: t) text\\n...</information>\\n\\n``, for
anything else :data:`INVALID_ACTION_OBS`.
"""
from __future__ import annotations

import re
from typing import Any, Optional, Sequence, Tuple

__all__ = ["PROMPT_TEMPLATE", "normalize_question", "prompt_text", "build_prompt", "question_from_prompt",
           "SEARCH_STOP", "ANSWER_STOP", "STOPS", "INVALID_ACTION_OBS", "format_docs", "search_observation",
           "parse_action"]

# ---------------------------------------------------------------------------- the prompt (§1)
#: Search-R1's instruction (``scripts/data_process/nq_search.py``, template ``base``), verbatim:
#: a single line; the question follows ``Question: `` and the text ends in a newline.
PROMPT_TEMPLATE = (
    "Answer the given question. "
    "You must conduct reasoning inside <think> and </think> first every time you get new "
    "information. "
    "After reasoning, if you find you lack some knowledge, you can call a search engine by "
    "<search> query </search> and it will return the top searched results between "
    "<information> and </information>. "
    "You can search as many times as your want. "
    "If you find no further external knowledge needed, you can directly provide the answer "
    "inside <answer> and </answer>, without detailed illustrations. "
    "For example, <answer> Beijing </answer>. Question: {question}\n"
)

_QUESTION_MARKER = "Question: "


def normalize_question(question: str) -> str:
    """Strip the question and append ``?`` if it does not end with one (Search-R1's rule)."""
    q = question.strip()
    if q and not q.endswith("?"):
        q += "?"
    return q


def prompt_text(question: str) -> str:
    """The raw (un-templated) prompt of docs/algorithm.md §1 for ``question``."""
    return PROMPT_TEMPLATE.format(question=normalize_question(question))


def build_prompt(question: str, tokenizer: Any = None) -> str:
    """The prompt string the policy sees.

    With a tokenizer that has a chat template, the raw prompt becomes one user message and
    the template is applied with ``add_generation_prompt=True`` (not tokenized); otherwise
    (no tokenizer, or no template) the raw prompt is returned.
    """
    text = prompt_text(question)
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
    return text


def question_from_prompt(content: str) -> str:
    """Recover the question from a Search-R1 prompt message (text after the last ``Question: ``)."""
    pos = content.rfind(_QUESTION_MARKER)
    q = content[pos + len(_QUESTION_MARKER):] if pos >= 0 else content
    return q.strip()


# ---------------------------------------------------------------------------- actions and observations (§1)
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
