"""Answer text: SQuAD/Search-R1 normalisation and the token spellings of gold aliases.

``normalize_answer`` is the one normalisation of the project (docs/algorithm.md §2); the trainer's
``tspo_fast.algo.rewards`` re-exports it.  ``answer_variants`` turns aliases into the token
sequences K1 searches for (docs/algorithm.md §5).
"""
from __future__ import annotations

import re
import string
from typing import Any, Iterable, List, Sequence, Union

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_LEADING_ARTICLE = re.compile(r"^(a|an|the)\s+", re.IGNORECASE)


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation, drop the articles a/an/the, collapse whitespace.

    Same steps, same order as Search-R1's and SQuAD's ``normalize_answer``.
    """
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def encode(tokenizer: Any, text: str) -> List[int]:
    """Token ids of ``text`` without special tokens, for any common tokenizer object.

    Accepts a Hugging Face tokenizer (``encode(text, add_special_tokens=False)``), a
    ``tokenizers.Tokenizer`` (``encode(...).ids``), a tiktoken-style encoder
    (``encode(text)``) or a plain callable ``text -> list[int]``.
    """
    if hasattr(tokenizer, "encode"):
        try:
            out = tokenizer.encode(text, add_special_tokens=False)
        except TypeError:
            out = tokenizer.encode(text)
    elif callable(tokenizer):
        out = tokenizer(text)
    else:
        raise TypeError(f"tokenizer of type {type(tokenizer).__name__} has no encode() and is not callable")
    ids = getattr(out, "ids", out)
    return [int(i) for i in ids]


def alias_list(aliases: Union[str, Iterable[str]]) -> List[str]:
    """Gold answers as a list: a bare string is one alias (datasets store both shapes)."""
    if isinstance(aliases, str):
        return [aliases]
    return list(aliases)


def _spellings(alias: str) -> List[str]:
    """Surface forms of one alias whose normalisation is the alias's normalisation."""
    alias = " ".join(alias.split())
    bases = [alias]
    no_article = _LEADING_ARTICLE.sub("", alias)
    if no_article and no_article != alias:
        bases.append(no_article)
    # trailing punctuation merges with what follows ("U.S." + ")" -> ".)"): also match without it
    for base in list(bases):
        stripped = base.rstrip(string.punctuation)
        if stripped and stripped != base:
            bases.append(stripped)
    # the normalised text itself ("U.S.A." -> "usa", "The Who" -> "who")
    norm = normalize_answer(alias)
    if norm:
        bases.append(norm)
    forms: List[str] = []
    for base in bases:
        for form in (base, base.lower(), base[:1].upper() + base[1:], base.title(), base.upper()):
            if form not in forms:
                forms.append(form)
    return forms


def answer_variants(tokenizer: Any, aliases: Iterable[str], *, prefixes: Sequence[str] = ("", " ")) -> List[List[int]]:
    """All token sequences that spell one of ``aliases`` (docs/algorithm.md §5).

    For each alias: as-is, lowercased, capitalised, title case and upper case, also without a
    leading article, without trailing punctuation and in normalised form; each with and without a leading space (more
    prefixes with ``prefixes``), as ``tokenizer`` encodes them.  Aliases whose normalised
    form is empty (e.g. "The") are skipped: they can never be matched by the string rule.
    Returns de-duplicated, non-empty token-id lists in a stable order.
    """
    if isinstance(aliases, str):
        raise TypeError("aliases must be a list of strings, not a single string")
    seen = set()
    out: List[List[int]] = []
    for alias in aliases:
        if not isinstance(alias, str):
            raise TypeError(f"aliases must be strings, got {type(alias).__name__}")
        if not normalize_answer(alias):
            continue
        for form in _spellings(alias):
            for prefix in prefixes:
                ids = tuple(encode(tokenizer, prefix + form))
                if ids and ids not in seen:
                    seen.add(ids)
                    out.append(list(ids))
    return out
