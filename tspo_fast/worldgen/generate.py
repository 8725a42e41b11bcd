"""Generate the bundled embedded world (``python -m tspo_fast.worldgen.generate [--out DIR]``).

An invented encyclopedia of countries, cities, rivers, people and companies, written as short
wiki-style passages, and questions about it in the Search-R1 layout:

* ``world_1hop``: the answer stands in the passage about the entity the question names
  ("Where was Aldo Venn born?").
* ``world_2hop``: the answer needs a second passage, reached through the first one's answer
  ("In which year was the founder of Velrix Dynamics born?": company -> founder -> birth year).

The world is built so that first-occurrence rewards matter: a person's passage names the
company they founded or worked for, so a natural first query ("founder of Velrix Dynamics")
often retrieves the founder's passage, and with it the final answer, next to passages of
employees of the same company and the company's own founding year (a second year that a
weak policy confuses with the birth year).  Other two-hop types (birthplace -> country,
capital -> river) need a genuinely second search.

Everything is drawn from one seeded ``random.Random``; files are written with fixed
formatting, so two runs give byte-identical files (a test checks the shipped ones).
"""
from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from ..data.qa import QAExample, to_searchr1_row
from ..world import DATA_DIR

SEED = 20261126
N_COUNTRIES = 12
N_CITIES = 110
N_RIVERS = 28
N_PEOPLE = 340
N_COMPANIES = 160
#: questions per (split, data_source)
N_QUESTIONS = {("train", "world_1hop"): 500, ("train", "world_2hop"): 500,
               ("test", "world_1hop"): 150, ("test", "world_2hop"): 150}

_ONSETS = ["b", "br", "c", "d", "dr", "f", "g", "gr", "h", "k", "kr", "l", "m", "n", "p",
           "r", "s", "st", "t", "tr", "v", "z", "th", "sh", "w", "j"]
_VOWELS = ["a", "e", "i", "o", "u", "a", "e", "o", "ai", "ei", "ou", "ia"]
_CODAS = ["", "", "", "n", "r", "l", "s", "m", "th", "rn", "nd", "x"]
_SURNAME_SUFFIX = ["", "", "", "son", "ard", "ley", "ov", "ez", "berg", "ski"]
_CITY_SUFFIX = ["holm", "ford", "vik", "dale", "burg", "mouth", "ton", "haven", "ria", "grad",
                "ora", "wick"]
_COUNTRY_SUFFIX = ["ia", "land", "ora", "esh", "avia", "istan"]
_COUNTRY_FORM = ["Republic", "Kingdom", "Federation", "Commonwealth"]
_SECTORS = {"Dynamics": "engineering", "Foods": "food processing", "Shipping": "shipping",
            "Textiles": "textile", "Robotics": "robotics", "Mining": "mining",
            "Airways": "aviation", "Pharma": "pharmaceutical", "Motors": "automotive",
            "Bank": "banking", "Software": "software", "Energy": "energy",
            "Press": "publishing", "Brewing": "brewing"}
_COMPANY_TAIL = ["Corporation", "Group", "Holdings", "Company"]
_OCCUPATIONS = ["engineer", "painter", "chemist", "economist", "novelist", "architect",
                "physician", "composer", "botanist", "merchant", "mathematician", "journalist",
                "sculptor", "astronomer", "diplomat", "inventor", "historian", "geologist"]
_KNOWN_FOR = ["a study of coastal winds", "a treatise on bridge design", "an early steam pump",
              "a popular travel diary", "a series of harbour paintings", "a reform of the postal "
              "service", "a method for dyeing wool", "a catalogue of northern stars",
              "a collection of folk songs", "a survey of mountain plants", "a novel about "
              "river sailors", "a new kind of loom", "a map of the eastern provinces",
              "a widely used arithmetic textbook"]
_CURRENCIES = ["mark", "crown", "florin", "taler", "dinar", "real", "sol", "lira"]


@dataclass
class Entity:
    """One thing the world talks about; ``attrs`` holds its facts."""

    kind: str
    name: str
    aliases: list[str]
    attrs: dict = field(default_factory=dict)
    pid: str = ""  # passage id, set when passages are numbered
    title: str = ""


class _Names:
    """Unique invented names; every name root is used once across all kinds."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.used: set[str] = set()

    def syllable(self) -> str:
        r = self.rng
        return r.choice(_ONSETS) + r.choice(_VOWELS) + r.choice(_CODAS)

    def root(self, n_syll: int = 2, min_len: int = 4, max_len: int = 9) -> str:
        while True:
            s = "".join(self.syllable() for _ in range(n_syll))
            if min_len <= len(s) <= max_len and s not in self.used:
                self.used.add(s)
                return s.capitalize()

    def suffixed(self, suffixes: list[str]) -> str:
        while True:
            s = (self.syllable() + self.rng.choice(suffixes)).capitalize()
            if s.lower() not in self.used and len(s) >= 5:
                self.used.add(s.lower())
                return s


def _article(word: str) -> str:
    return "an" if word[0].lower() in "aeiou" else "a"


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _case_variants(name: str) -> list[str]:
    out = [name]
    if name.lower() != name:
        out.append(name.lower())
    return out


def build_world(seed: int = SEED) -> dict[str, list[Entity]]:
    """Draw the entities and their relations."""
    rng = random.Random(seed)
    names = _Names(rng)

    countries = []
    for _ in range(N_COUNTRIES):
        base = names.suffixed(_COUNTRY_SUFFIX)
        form = rng.choice(_COUNTRY_FORM)
        formal = f"the {form} of {base}"
        countries.append(Entity("country", base, [base, base.lower(), f"{form} of {base}", formal],
                                {"formal": formal, "independence": rng.randint(1790, 1985),
                                 "currency": rng.choice(_CURRENCIES),
                                 "provinces": rng.randint(4, 19)}))

    cities = []
    for i in range(N_CITIES):
        base = names.suffixed(_CITY_SUFFIX)
        if rng.random() < 0.1:
            name, aliases = f"Port {base}", [f"Port {base}", f"port {base.lower()}", base]
        else:
            name, aliases = base, _case_variants(base)
        country = countries[i % N_COUNTRIES] if i < 2 * N_COUNTRIES else rng.choice(countries)
        cities.append(Entity("city", name, aliases,
                             {"country": country, "founded": rng.randint(820, 1860),
                              "population": rng.randint(8, 900) * 1000, "river": None}))
    for c in countries:
        own = [y for y in cities if y.attrs["country"] is c]
        c.attrs["capital"] = rng.choice(own)
        c.attrs["capital"].attrs["capital_of"] = c

    rivers = []
    free = cities[:]
    rng.shuffle(free)
    for _ in range(N_RIVERS):
        base = names.root()
        through = [free.pop() for _ in range(min(rng.randint(2, 5), len(free)))]
        r = Entity("river", f"{base} River",
                   [f"{base} River", f"the {base} River", base, f"the {base}", f"{base.lower()} river"],
                   {"length": rng.randint(40, 2400), "through": through})
        for y in through:
            y.attrs["river"] = r
        rivers.append(r)

    people = []
    for _ in range(N_PEOPLE):
        first = names.root(2, 3, 7)
        last = names.root(2, 4, 8) + rng.choice(_SURNAME_SUFFIX)
        name = f"{first} {last}"
        people.append(Entity("person", name, [name, name.lower(), f"{first[0]}. {last}"],
                             {"born": rng.randint(1880, 1990), "birthplace": rng.choice(cities),
                              "occupation": rng.choice(_OCCUPATIONS),
                              "pronoun": rng.choice(["He", "She"]),
                              "known_for": rng.choice(_KNOWN_FOR)}))

    companies = []
    founders = [p for p in people if p.attrs["born"] <= 1975]
    rng.shuffle(founders)
    for founder in founders[:N_COMPANIES]:
        root = names.root()
        sector = rng.choice(sorted(_SECTORS))
        short = f"{root} {sector}"
        if rng.random() < 0.35:
            tail = rng.choice(_COMPANY_TAIL)
            name = f"{short} {tail}"
            aliases = [name, short, f"{root[0]}{sector[0]}{tail[0]}", name.lower()]
        else:
            name, aliases = short, [short, short.lower(), root]
        year = min(founder.attrs["born"] + rng.randint(22, 50), 2018)
        c = Entity("company", name, aliases,
                   {"founder": founder, "founded": year, "hq": rng.choice(cities),
                    "industry": _SECTORS[sector], "employees": rng.randint(2, 400) * 50})
        founder.attrs["founded_company"] = c
        companies.append(c)
    for p in people:
        if "founded_company" not in p.attrs and rng.random() < 0.5:
            p.attrs["worked_at"] = rng.choice(companies)
            p.attrs["worked_years"] = rng.randint(3, 30)
    return {"country": countries, "city": cities, "river": rivers, "person": people,
            "company": companies}


# --------------------------------------------------------------------------------------------
# passages


def _person_text(p: Entity, rng: random.Random) -> str:
    a = p.attrs
    occ, born, city, pr = a["occupation"], a["born"], a["birthplace"].name, a["pronoun"]
    first = rng.choice([
        f"{p.name} (born {born} in {city}) is {_article(occ)} {occ}.",
        f"{p.name} is {_article(occ)} {occ} who was born in {city} in {born}.",
        f"Born in {city} in {born}, {p.name} became {_article(occ)} {occ}.",
    ])
    parts = [first]
    if "founded_company" in a:
        c = a["founded_company"]
        parts.append(rng.choice([f"{pr} founded {c.name} in {c.attrs['founded']}.",
                                 f"In {c.attrs['founded']} {pr.lower()} founded {c.name}."]))
    elif "worked_at" in a:
        parts.append(f"{pr} worked for {a['worked_at'].name} for {a['worked_years']} years.")
    parts.append(f"{pr} is best known for {a['known_for']}.")
    return " ".join(parts)


def _company_text(c: Entity, rng: random.Random) -> str:
    a = c.attrs
    ind, f, y, hq = a["industry"], a["founder"].name, a["founded"], a["hq"].name
    first = rng.choice([
        f"{c.name} is {_article(ind)} {ind} company headquartered in {hq}. "
        f"It was founded in {y} by {f}.",
        f"Founded by {f} in {y}, {c.name} is {_article(ind)} {ind} company based in {hq}.",
        f"{c.name} was established in {y} by {f}. The {ind} company has its headquarters "
        f"in {hq}.",
    ])
    return f"{first} It employs about {a['employees']} people."


def _city_text(y: Entity, rng: random.Random) -> str:
    a = y.attrs
    k = a["country"].name
    cap = ", of which it is the capital" if a.get("capital_of") else ""
    river = f" on the {a['river'].name}" if a["river"] else ""
    first = rng.choice([
        f"{y.name} is a city in {k}{cap}. It was founded in {a['founded']}.",
        f"{y.name} is a city in {k}{cap}, founded in {a['founded']}.",
    ])
    loc = f" The city lies{river}." if river else " The city lies on a wide plain."
    return f"{first}{loc} Its population is about {a['population']:,}."


def _country_text(k: Entity, rng: random.Random) -> str:
    a = k.attrs
    formal = a["formal"][0].upper() + a["formal"][1:]
    return (f"{formal}, usually called {k.name}, is a country whose capital is "
            f"{a['capital'].name}. It became independent in {a['independence']}. "
            f"It is divided into {a['provinces']} provinces and its currency is the "
            f"{a['currency']}.")


def _river_text(r: Entity, rng: random.Random) -> str:
    a = r.attrs
    return (f"The {r.name} is a river about {a['length']} km long. It flows through "
            f"{_join([y.name for y in a['through']])}.")


_TEXT = {"person": _person_text, "company": _company_text, "city": _city_text,
         "country": _country_text, "river": _river_text}


def build_passages(world: dict[str, list[Entity]], rng: random.Random) -> list[dict]:
    """One passage per entity, shuffled, ids ``"0"``..; sets each entity's ``pid``."""
    ents = [e for kind in ("country", "city", "river", "person", "company") for e in world[kind]]
    texts = [(e, _TEXT[e.kind](e, rng)) for e in ents]
    rng.shuffle(texts)
    rows = []
    for i, (e, text) in enumerate(texts):
        e.pid = str(i)
        rows.append({"id": e.pid, "contents": f'"{e.name}"\n{text}'})
    return rows


# --------------------------------------------------------------------------------------------
# questions


def _one_hop(world: dict[str, list[Entity]]) -> dict[str, list[tuple]]:
    """Candidate one-hop questions per type: (question templates, entity, answer aliases, support)."""
    P, C, Y, K = world["person"], world["company"], world["city"], world["country"]
    return {
        "birthplace": [(["Where was {} born?", "In which city was {} born?"], p.name,
                        p.attrs["birthplace"].aliases, [p.pid]) for p in P],
        "birthyear": [(["In which year was {} born?", "When was {} born?"], p.name,
                       [str(p.attrs["born"])], [p.pid]) for p in P],
        "founder": [(["Who founded {}?", "Who is the founder of {}?"], c.name,
                     c.attrs["founder"].aliases, [c.pid]) for c in C],
        "hq": [(["In which city is {} headquartered?", "Where is {} based?"], c.name,
                c.attrs["hq"].aliases, [c.pid]) for c in C],
        "company_year": [(["In what year was {} founded?"], c.name, [str(c.attrs["founded"])],
                          [c.pid]) for c in C],
        "capital": [(["What is the capital of {}?"], k.name, k.attrs["capital"].aliases, [k.pid])
                    for k in K],
        "city_country": [(["In which country is {}?", "In which country is {} located?"], y.name,
                          y.attrs["country"].aliases, [y.pid]) for y in Y],
        "city_river": [(["Which river flows through {}?"], y.name, y.attrs["river"].aliases,
                        [y.pid]) for y in Y if y.attrs["river"]],
    }


def _two_hop(world: dict[str, list[Entity]]) -> dict[str, list[tuple]]:
    P, C, K = world["person"], world["company"], world["country"]
    fo = lambda c: c.attrs["founder"]
    bp = lambda p: p.attrs["birthplace"]
    cap = lambda k: k.attrs["capital"]
    return {
        "founder_birthyear": [(["In which year was the founder of {} born?",
                                "When was the founder of {} born?"], c.name,
                               [str(fo(c).attrs["born"])], [c.pid, fo(c).pid]) for c in C],
        "founder_birthplace": [(["Where was the founder of {} born?",
                                 "In which city was the founder of {} born?"], c.name,
                                bp(fo(c)).aliases, [c.pid, fo(c).pid]) for c in C],
        "hq_country": [(["In which country is {} headquartered?",
                         "In which country does {} have its headquarters?"], c.name,
                        c.attrs["hq"].attrs["country"].aliases, [c.pid, c.attrs["hq"].pid])
                       for c in C],
        "birthplace_country": [(["In which country was {} born?"], p.name,
                                bp(p).attrs["country"].aliases, [p.pid, bp(p).pid]) for p in P],
        "birthplace_river": [(["Which river flows through the city where {} was born?",
                               "Which river flows through the birthplace of {}?"], p.name,
                              bp(p).attrs["river"].aliases, [p.pid, bp(p).pid])
                             for p in P if bp(p).attrs["river"]],
        "capital_founded": [(["In what year was the capital of {} founded?"], k.name,
                             [str(cap(k).attrs["founded"])], [k.pid, cap(k).pid]) for k in K],
        "capital_river": [(["Which river flows through the capital of {}?"], k.name,
                           cap(k).attrs["river"].aliases, [k.pid, cap(k).pid])
                          for k in K if cap(k).attrs["river"]],
    }


#: share of each question type within its data source
_MIX = {
    "world_1hop": {"birthplace": 0.2, "birthyear": 0.2, "founder": 0.15, "hq": 0.1,
                   "company_year": 0.1, "capital": 0.02, "city_country": 0.13, "city_river": 0.1},
    "world_2hop": {"founder_birthyear": 0.3, "founder_birthplace": 0.2, "hq_country": 0.15,
                   "birthplace_country": 0.15, "birthplace_river": 0.14, "capital_founded": 0.03,
                   "capital_river": 0.03},
}


def build_questions(world: dict[str, list[Entity]], rng: random.Random) -> dict[str, list[QAExample]]:
    """Draw the train and test questions; no (type, entity) pair is in both splits."""
    pools = {"world_1hop": _one_hop(world), "world_2hop": _two_hop(world)}
    out: dict[str, list[tuple]] = {"train": [], "test": []}
    for source, mix in _MIX.items():
        left = {}
        for qtype in mix:
            cands = pools[source][qtype][:]
            rng.shuffle(cands)
            left[qtype] = cands
        for split in ("test", "train"):
            n = N_QUESTIONS[(split, source)]
            want = {t: round(share * n) for t, share in mix.items()}
            # a type with too few candidates (e.g. capitals) hands its share to the largest types
            take = {t: min(want[t], len(left[t]) // (2 if split == "test" else 1)) for t in mix}
            by_share = sorted(mix, key=lambda t: -mix[t])
            while sum(take.values()) < n:
                grew = False
                for t in by_share:
                    if sum(take.values()) < n and take[t] < len(left[t]):
                        take[t] += 1
                        grew = True
                if not grew:
                    raise RuntimeError(f"not enough {source} questions for {split}")
            while sum(take.values()) > n:
                take[max(take, key=take.get)] -= 1
            for qtype in mix:
                chosen, left[qtype] = left[qtype][:take[qtype]], left[qtype][take[qtype]:]
                for templates, name, answers, support in chosen:
                    q = rng.choice(templates).format(name)
                    out[split].append((source, qtype, q, answers, support))
    result = {}
    for split, items in out.items():
        rng.shuffle(items)
        exs = []
        for i, (source, qtype, q, answers, support) in enumerate(items):
            rid = f"{split}_{i}"
            exs.append(QAExample(uid=f"{source}/{rid}", question=q, aliases=tuple(answers),
                                 data_source=source, index=i, split=split, id=rid,
                                 extra={"hops": 1 if source == "world_1hop" else 2,
                                        "qtype": qtype, "support": list(support)}))
        result[split] = exs
    return result


def practice_questions(seed: int = SEED) -> list[QAExample]:
    """Every (type, entity) question of the world that the test split does not ask.

    For the warm-start demonstrations (``tspo_fast.worldgen.warmstart``): many more distinct
    questions than the training split, so a small model learns to read answers out of the
    retrieved passages rather than memorising them.  Rebuilds the world exactly as ``generate``
    does (same passage ids); the question wording is drawn from a separate seeded generator.
    """
    rng = random.Random(seed + 1)
    world = build_world(seed)
    build_passages(world, rng)
    test = build_questions(world, rng)["test"]
    asked = {(ex.extra["qtype"], ex.extra["support"][0]) for ex in test}
    pick = random.Random(seed + 2)
    out = []
    for source, pool in (("world_1hop", _one_hop(world)), ("world_2hop", _two_hop(world))):
        for qtype, cands in pool.items():
            for templates, name, answers, support in cands:
                if (qtype, support[0]) in asked:
                    continue
                i = len(out)
                out.append(QAExample(uid=f"{source}/practice_{i}", question=pick.choice(templates).format(name),
                                     aliases=tuple(answers), data_source=source, index=i, split="practice",
                                     id=f"practice_{i}", extra={"hops": 1 if source == "world_1hop" else 2,
                                                                "qtype": qtype, "support": list(support)}))
    return out


def _write_jsonl(rows: list[dict], path: Path) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def generate(out_dir: str | Path = DATA_DIR, seed: int = SEED) -> dict[str, Path]:
    """Write ``corpus.jsonl``, ``train.jsonl`` and ``test.jsonl`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed + 1)
    world = build_world(seed)
    corpus = build_passages(world, rng)
    questions = build_questions(world, rng)
    paths = {"corpus": out / "corpus.jsonl", "train": out / "train.jsonl",
             "test": out / "test.jsonl"}
    _write_jsonl(corpus, paths["corpus"])
    for split in ("train", "test"):
        _write_jsonl([to_searchr1_row(ex) for ex in questions[split]], paths[split])
    return paths


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(DATA_DIR), help="output folder (default: the package's)")
    ap.add_argument("--seed", type=int, default=SEED)
    args = ap.parse_args(argv)
    for name, p in generate(args.out, args.seed).items():
        print(f"{name}: {p} ({p.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
