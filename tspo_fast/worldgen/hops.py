"""Generate the bundled *hops* world (``python -m tspo_fast.worldgen.hops [--out DIR]``).

A second invented encyclopedia, built for the regime the TSPO paper studies: reading a passage is
easy, finding the right passages over several hops is what fails.  Its passages are short and
regular (one subject, one fact per sentence, each relation in a fixed phrase), and every fact is
stated once, in its subject's passage only, pointing forward along the chain::

    landmark --built by--> company --founded by--> person --born in--> city --in--> country
    landmark --designed by--> person;  landmark --in--> city;  company --headquarters in--> city

Questions (``data_source`` ``hops_2`` and ``hops_3``) follow two or three of those links from the
entity they name; the answer stands in the last passage of the chain only (the generator drops a
question whose answer an earlier passage of its chain names), so the first search cannot return
it (it also drops any question whose first-hop search, or a search for the question's own words,
retrieves an answer alias in its top ``topk`` passages).  Names share roots
("Zarn Bridge", "Zarn Tower", "Zarn Motors"; people share surnames), so passages that share the
question's words compete with the right one, and a query that is not the whole name can land on a
sibling.  ``extra_info`` holds ``hops``, ``qtype`` and ``support`` (the passage ids of the chain,
hop by hop).  One-hop questions exist only as practice questions for the warm start
(:func:`practice_questions`).

Everything is drawn from one seeded ``random.Random``; two runs give byte-identical files.
"""
from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import bm25s

from ..algo.rewards import normalize_answer
from ..data.qa import QAExample, to_searchr1_row
from ..world import world_dir
from .generate import _Names

SEED = 20261206
WORLD = "hops"
N_COUNTRIES = 24
N_CITIES = 150
N_PEOPLE = 480
N_COMPANIES = 300
N_LANDMARKS = 420
#: questions per (split, data_source)
N_QUESTIONS = {("train", "hops_2"): 800, ("train", "hops_3"): 800,
               ("test", "hops_2"): 500, ("test", "hops_3"): 500}
#: passages per search when the generator checks that a first search cannot return the answer
TOPK = 3

_CITY_SUFFIX = ["holm", "ford", "vik", "dale", "burg", "mouth", "ton", "haven", "ria", "grad", "ora", "wick",
                "stad", "mere"]
_COUNTRY_SUFFIX = ["ia", "land", "ora", "esh", "avia", "istan", "mark", "ovo"]
_INDUSTRIES = {"Motors": "car", "Foods": "food", "Shipping": "shipping", "Textiles": "textile",
               "Robotics": "robotics", "Mining": "mining", "Airways": "airline", "Pharma": "drug",
               "Steel": "steel", "Energy": "energy", "Press": "publishing", "Brewing": "brewing",
               "Cement": "cement", "Glassworks": "glass"}
_LANDMARKS = {"Bridge": "bridge", "Tower": "tower", "Dam": "dam", "Stadium": "stadium", "Library": "library",
              "Lighthouse": "lighthouse", "Opera House": "opera house", "Museum": "museum", "Canal": "canal",
              "Observatory": "observatory"}
_OCCUPATIONS = ["engineer", "architect", "banker", "chemist", "merchant", "inventor", "surveyor", "painter",
                "economist", "physician", "lawyer", "geologist"]
_CURRENCIES = ["mark", "crown", "florin", "taler", "dinar", "real", "sol", "lira"]


@dataclass
class Entity:
    """One thing the world talks about; ``attrs`` holds its facts (other entities or values)."""

    kind: str
    name: str
    aliases: List[str]
    attrs: dict = field(default_factory=dict)
    pid: str = ""


def _aliases(name: str) -> List[str]:
    return [name] if name.lower() == name else [name, name.lower()]


def build_world(seed: int = SEED) -> Dict[str, List[Entity]]:
    """Draw the entities and the links between them."""
    rng = random.Random(seed)
    names = _Names(rng)
    countries = [Entity("country", n, _aliases(n), {"currency": rng.choice(_CURRENCIES)})
                 for n in (names.suffixed(_COUNTRY_SUFFIX) for _ in range(N_COUNTRIES))]
    cities = []
    for i in range(N_CITIES):
        n = names.suffixed(_CITY_SUFFIX)
        country = countries[i % N_COUNTRIES] if i < 2 * N_COUNTRIES else rng.choice(countries)
        cities.append(Entity("city", n, _aliases(n), {"country": country,
                                                       "population": rng.randint(8, 900) * 1000}))
    for c in countries:
        c.attrs["capital"] = rng.choice([y for y in cities if y.attrs["country"] is c])

    surnames = [names.root(2, 4, 8) for _ in range(N_PEOPLE // 2)]   # two people per surname on average
    firsts = [names.root(2, 3, 7) for _ in range(N_PEOPLE // 3)]
    people, seen = [], set()
    while len(people) < N_PEOPLE:
        n = f"{rng.choice(firsts)} {rng.choice(surnames)}"
        if n in seen:
            continue
        seen.add(n)
        people.append(Entity("person", n, _aliases(n), {"occupation": rng.choice(_OCCUPATIONS),
                                                         "birthplace": rng.choice(cities),
                                                         "pronoun": rng.choice(["He", "She"])}))
    # companies and landmarks share name roots: "Zarn Motors" next to "Zarn Bridge" and "Zarn Tower"
    roots = [names.root() for _ in range((N_COMPANIES + N_LANDMARKS) // 3 + 1)]
    used: set = set()

    def named(suffixes: Sequence[str]) -> str:
        while True:
            n = f"{rng.choice(roots)} {rng.choice(suffixes)}"
            if n not in used:
                used.add(n)
                return n

    companies = []
    for _ in range(N_COMPANIES):
        n = named(sorted(_INDUSTRIES))
        companies.append(Entity("company", n, _aliases(n), {"industry": _INDUSTRIES[n.split(" ", 1)[1]],
                                                            "founder": rng.choice(people),
                                                            "hq": rng.choice(cities)}))
    designers = [p for p in people if p.attrs["occupation"] in ("engineer", "architect", "surveyor")]
    landmarks = []
    for _ in range(N_LANDMARKS):
        n = named(sorted(_LANDMARKS))
        landmarks.append(Entity("landmark", n, _aliases(n) + [f"the {n}", f"the {n}".lower()],
                                {"type": _LANDMARKS[n.split(" ", 1)[1]], "city": rng.choice(cities),
                                 "builder": rng.choice(companies), "designer": rng.choice(designers)}))
    return {"country": countries, "city": cities, "person": people, "company": companies, "landmark": landmarks}


# --------------------------------------------------------------------------------------------
# passages


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _text(e: Entity) -> str:
    a = e.attrs
    if e.kind == "country":
        return f"{e.name} is a country. Its capital is {a['capital'].name}. Its currency is the {a['currency']}."
    if e.kind == "city":
        return f"{e.name} is a city in {a['country'].name}. About {a['population']:,} people live there."
    if e.kind == "person":
        return f"{e.name} is {_article(a['occupation'])} {a['occupation']}. {a['pronoun']} was born in {a['birthplace'].name}."
    if e.kind == "company":
        return (f"{e.name} is {_article(a['industry'])} {a['industry']} company. It was founded by {a['founder'].name}. "
                f"Its headquarters are in {a['hq'].name}.")
    return (f"The {e.name} is {_article(a['type'])} {a['type']} in {a['city'].name}. It was built by {a['builder'].name}. "
            f"It was designed by {a['designer'].name}.")


def build_passages(world: Dict[str, List[Entity]], rng: random.Random) -> List[dict]:
    """One passage per entity, shuffled, ids ``"0"``..; sets each entity's ``pid``."""
    ents = [e for kind in ("country", "city", "person", "company", "landmark") for e in world[kind]]
    rng.shuffle(ents)
    rows = []
    for i, e in enumerate(ents):
        e.pid = str(i)
        rows.append({"id": e.pid, "contents": f'"{e.name}"\n{_text(e)}'})
    return rows


# --------------------------------------------------------------------------------------------
# questions

#: question types: (start kind, chain of attributes, templates); {} is the start entity's name
QTYPES: Dict[str, Tuple[str, Tuple[str, ...], Tuple[str, ...]]] = {
    # one hop (practice questions of the warm start only)
    "builder": ("landmark", ("builder",), ("Which company built {}?",)),
    "designer": ("landmark", ("designer",), ("Who designed {}?",)),
    "landmark_city": ("landmark", ("city",), ("In which city is {}?",)),
    "founder": ("company", ("founder",), ("Who founded {}?",)),
    "hq": ("company", ("hq",), ("In which city is {} headquartered?",)),
    "birthplace": ("person", ("birthplace",), ("Where was {} born?",)),
    "city_country": ("city", ("country",), ("In which country is {}?",)),
    "capital": ("country", ("capital",), ("What is the capital of {}?",)),
    # two hops
    "builder_founder": ("landmark", ("builder", "founder"), ("Who founded the company that built {}?",)),
    "designer_birthplace": ("landmark", ("designer", "birthplace"), ("Where was the designer of {} born?",)),
    "builder_hq": ("landmark", ("builder", "hq"), ("In which city is the company that built {} headquartered?",)),
    "founder_birthplace": ("company", ("founder", "birthplace"), ("Where was the founder of {} born?",)),
    "hq_country": ("company", ("hq", "country"), ("In which country is {} headquartered?",)),
    "birthplace_country": ("person", ("birthplace", "country"), ("In which country was {} born?",)),
    "landmark_country": ("landmark", ("city", "country"), ("In which country is {}?",)),
    # three hops
    "builder_founder_birthplace": ("landmark", ("builder", "founder", "birthplace"),
                                   ("Where was the founder of the company that built {} born?",)),
    "designer_birthplace_country": ("landmark", ("designer", "birthplace", "country"),
                                    ("In which country was the designer of {} born?",)),
    "founder_birthplace_country": ("company", ("founder", "birthplace", "country"),
                                   ("In which country was the founder of {} born?",)),
    "builder_hq_country": ("landmark", ("builder", "hq", "country"),
                           ("In which country is the company that built {} headquartered?",)),
}
#: share of each question type within its data source
MIX = {
    "hops_2": {"builder_founder": 0.2, "designer_birthplace": 0.2, "builder_hq": 0.15, "founder_birthplace": 0.15,
               "hq_country": 0.1, "birthplace_country": 0.1, "landmark_country": 0.1},
    "hops_3": {"builder_founder_birthplace": 0.3, "designer_birthplace_country": 0.25,
               "founder_birthplace_country": 0.2, "builder_hq_country": 0.25},
}


def _display(e: Entity) -> str:
    """How a question names ``e`` (landmarks with their article)."""
    return f"the {e.name}" if e.kind == "landmark" else e.name


def chain(start: Entity, attrs: Sequence[str]) -> List[Entity]:
    """The entities a question about ``start`` walks through: ``[start, hop 1, ..., answer]``."""
    out = [start]
    for a in attrs:
        out.append(out[-1].attrs[a])
    return out


def candidates(world: Dict[str, List[Entity]], qtype: str) -> List[Tuple[str, Entity, List[Entity]]]:
    """Every (question text, start entity, chain) of ``qtype``; one template per question."""
    kind, attrs, templates = QTYPES[qtype]
    return [(templates[0].format(_display(e)), e, chain(e, attrs)) for e in world[kind]]


def _example(uid_source: str, rid: str, index: int, split: str, qtype: str, q: str,
             walk: List[Entity]) -> QAExample:
    return QAExample(uid=f"{uid_source}/{rid}", question=q, aliases=tuple(walk[-1].aliases), data_source=uid_source,
                     index=index, split=split, id=rid,
                     extra={"hops": len(walk) - 1, "qtype": qtype, "support": [e.pid for e in walk[:-1]]})


def first_search_finds(retrieve: Callable[[List[str]], List[List[str]]], q: str, walk: List[Entity]) -> bool:
    """Whether a search for the start entity's name, or for the question's words, returns an
    answer alias in its top passages (``retrieve``: queries -> the passages' texts)."""
    texts = retrieve([walk[0].name, q])
    found = [normalize_answer(t) for hits in texts for t in hits]
    return any(f" {normalize_answer(a)} " in f" {t} " for a in walk[-1].aliases for t in found)


def answer_only_at_the_end(walk: List[Entity]) -> bool:
    """Whether no passage of the chain before the last names the answer (a company headquartered
    in the city where its founder was born would give the answer one hop early)."""
    texts = [normalize_answer(_text(e)) for e in walk[:-2]]
    return not any(f" {normalize_answer(a)} " in f" {t} " for a in walk[-1].aliases for t in texts)


def build_questions(world, rng: random.Random, retrieve) -> Dict[str, List[QAExample]]:
    """The train and test questions: no (type, start entity) pair in both splits, none whose
    answer a passage of the chain names before the last one, none whose first search returns it."""
    out: Dict[str, List[tuple]] = {"train": [], "test": []}
    for source, mix in MIX.items():
        for qtype, share in mix.items():
            cands = [c for c in candidates(world, qtype)
                     if answer_only_at_the_end(c[2]) and not first_search_finds(retrieve, c[0], c[2])]
            rng.shuffle(cands)
            for split in ("test", "train"):
                n = round(share * N_QUESTIONS[(split, source)])
                if len(cands) < n:
                    raise RuntimeError(f"{qtype}: {len(cands)} usable questions left, {split} needs {n}")
                out[split] += [(source, qtype, q, walk) for q, _, walk in cands[:n]]
                cands = cands[n:]
    result = {}
    for split, items in out.items():
        rng.shuffle(items)
        result[split] = [_example(source, f"{split}_{i}", i, split, qtype, q, walk)
                         for i, (source, qtype, q, walk) in enumerate(items)]
    return result


def practice_questions(world: Dict[str, List[Entity]], test: Sequence[QAExample], seed: int = SEED) -> List[QAExample]:
    """Every question of every type (one-hop ones included) whose start entity and type the
    test split does not ask: the warm start's demonstrations."""
    asked = {(ex.extra["qtype"], ex.extra["support"][0]) for ex in test}
    out = []
    for qtype in QTYPES:
        for q, start, walk in candidates(world, qtype):
            if (qtype, start.pid) not in asked:
                i = len(out)
                out.append(_example(f"hops_{len(walk) - 1}", f"practice_{i}", i, "practice", qtype, q, walk))
    random.Random(seed + 2).shuffle(out)
    return out


# --------------------------------------------------------------------------------------------
# files


def _write_jsonl(rows: List[dict], path: Path) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _bm25(corpus: List[dict], topk: int):
    """A BM25 search over ``corpus`` as the rollout's retriever runs it (bm25s, English stopwords)."""
    texts = [r["contents"] for r in corpus]
    model = bm25s.BM25()
    model.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)

    def retrieve(queries: List[str]) -> List[List[str]]:
        idx, _ = model.retrieve(bm25s.tokenize(queries, stopwords="en", show_progress=False), k=topk,
                                show_progress=False)
        return [[texts[j] for j in row] for row in idx.tolist()]

    return retrieve


@dataclass
class HopsWorld:
    """The world, its passages and its questions, rebuilt exactly as :func:`generate` writes them."""

    entities: Dict[str, List[Entity]]
    corpus: List[dict]
    questions: Dict[str, List[QAExample]]

    def practice(self) -> List[QAExample]:
        return practice_questions(self.entities, self.questions["test"])


def build(seed: int = SEED, topk: int = TOPK) -> HopsWorld:
    rng = random.Random(seed + 1)
    entities = build_world(seed)
    corpus = build_passages(entities, rng)
    questions = build_questions(entities, rng, _bm25(corpus, topk))
    return HopsWorld(entities, corpus, questions)


def generate(out_dir: Optional[str] = None, seed: int = SEED) -> Dict[str, Path]:
    """Write ``corpus.jsonl``, ``train.jsonl`` and ``test.jsonl`` into ``out_dir``."""
    out = Path(out_dir) if out_dir else world_dir(WORLD)
    out.mkdir(parents=True, exist_ok=True)
    w = build(seed)
    paths = {"corpus": out / "corpus.jsonl", "train": out / "train.jsonl", "test": out / "test.jsonl"}
    _write_jsonl(w.corpus, paths["corpus"])
    for split in ("train", "test"):
        _write_jsonl([to_searchr1_row(ex) for ex in w.questions[split]], paths[split])
    return paths


def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="output folder (default: the package's, tspo_fast/world/hops)")
    ap.add_argument("--seed", type=int, default=SEED)
    args = ap.parse_args(argv)
    for name, p in generate(args.out, args.seed).items():
        print(f"{name}: {p} ({p.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
