"""The hops world's warm-start policy: a tiny Qwen2 that reads well but searches too few hops.

``python -m tspo_fast.worldgen.hops_warmstart --out DIR`` writes what ``bundled:hops-warmstart``
ships in ``tspo_fast/world/hops_policy``.  Every random choice comes from ``--seed``.

1. a byte-level BPE tokenizer trained on the hops world's passages, prompts and the
   demonstrations' wording (every entity name is one or two tokens);
2. a small Qwen2-architecture model (:class:`HopsWarmStartSpec`; head size 32 for vLLM's CPU
   backend);
3. supervised fine-tuning on the action tokens (observations masked, as in RL), in the order the
   tiny world's warm start showed to work (``tspo_fast.worldgen.warmstart.sft``): *copy examples*
   (a question about a random entity of the right kind and its first search: only copying the
   name predicts it), then *reading examples* (the chain searched right up to a hop whose passage
   states another value of the right kind, and the action built on that value: only reading
   predicts it), each alone first, then everything mixed with *demonstrations*
   of the protocol for every practice question of the world (one-, two- and three-hop questions
   whose start entity and type the test split does not ask; :func:`tspo_fast.worldgen.hops.practice_questions`),
   laid out exactly as rollouts lay them out, with the observations the real BM25 index returns.
   A demonstration follows the chain hop by hop; each action's ``<think>`` restates the fact the
   last passage gave ("The Zarn Bridge was built by Velrix Motors.") before naming the next search.

The demonstrations read **perfectly** — whenever the chain is complete the answer is the one the
last passage states (in ``swap_share`` of them the last passage's answer is replaced by another
entity of the same kind, so that reading, not memory, predicts it) — but they **search too
little**: after each hop but the last the demonstration goes on with probability ``p_continue``
and otherwise answers at once, without restating what it read, with a wrong entity of the
answer's kind (one the context shows when there is one: the wrong hop's city, say) — a thought
that states a fact is always followed by the next search or, after the chain's last link, by
that fact's value as the answer; a share ``p_bad_query`` of searches uses only the
first word of the name (which often retrieves a sibling: "Zarn" for "Zarn Bridge") and then gives
up with a guess; ``p_memory`` answer without searching.  With ``p_continue`` below one half,
greedy decoding stops after the first hop, while sampled rollouts sometimes go all the way: RL has
to teach the policy to search deeper, as FOLR's paper regime asks (docs/algorithm.md §3).
What the build reached is in ``warmstart.json`` (losses; :func:`tspo_fast.worldgen.ceiling.reading_probe`
gives the reading accuracy with the chain searched right).
"""
from __future__ import annotations

import argparse
import json
import os
import random
from dataclasses import asdict, dataclass, replace
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from transformers import AutoModelForCausalLM

from ..models import world_texts
from ..models.tiny import TinyModelSpec, build_tiny_model, load_tokenizer
from ..protocol import build_prompt, search_observation
from ..retrieval import InProcessRetriever
from ..retrieval.bundled import bundled_index
from ..training.checkpoint import staged_folder
from . import hops
from .warmstart import WARM_MODEL, search_first_prob, sft, warm_model

#: how a thought states the link ``attr`` from ``x`` to ``y``
FACT = {"builder": "{x} was built by {y}", "designer": "{x} was designed by {y}", "city": "{x} is in {y}",
        "founder": "{x} was founded by {y}", "hq": "{x} has its headquarters in {y}",
        "birthplace": "{x} was born in {y}", "country": "{x} is in {y}", "capital": "The capital of {x} is {y}"}


@dataclass(frozen=True)
class HopsWarmStartSpec:
    seed: int = 0                   # every random choice, the model's initialisation included
    model: TinyModelSpec = WARM_MODEL  # tokenizer vocabulary and model shape (its own seed is replaced by ``seed``)
    copy_examples: int = 16000       # first searches for a random entity of the question's kind
    copy_batch_size: int = 32
    copy_first_batches: int = 300    # copy batches alone before the rest join in
    reading_examples: int = 12000    # a hop whose passage states another value, and the action built on it
    reading_batch_size: int = 16
    reading_first_batches: int = 300  # reading batches alone, after the first copy batches
    demos_per_question: int = 1
    epochs: int = 1
    batch_size: int = 16
    lr: float = 3e-3
    max_obs_tokens: int = 200
    topk: int = 3
    max_questions: int = 0          # 0: every practice question (smaller for smoke tests)
    p_continue: float = 0.4         # after a hop that is not the last: search the next one (else answer now)
    p_bad_query: float = 0.1        # a search with the name's first word only, then a guess
    p_memory: float = 0.05          # answer at once, without searching
    swap_share: float = 0.7         # demonstrations whose last passage states another answer (read, not recalled)


def _name(e: hops.Entity) -> str:
    return f"the {e.name}" if e.kind == "landmark" else e.name


def _fact(attr: str, x: hops.Entity, y: str) -> str:
    s = FACT[attr].format(x=_name(x), y=y)
    return s[0].upper() + s[1:]


def _search(thought: str, query: str) -> str:
    return f"<think> {thought} </think>\n<search> {query} </search>"


def _answer(fact: str, ans: str) -> str:
    """The answer turn: the fact just read (if any), then "The answer is ..."."""
    return f"<think> {fact}The answer is {ans}. </think>\n<answer> {ans} </answer>"


class Demonstrator:
    """Draws the turns of one demonstration: ``[(action text, search query or None, observation
    text or None), ...]``, with the real index's passages (and the last passage's answer swapped
    when asked)."""

    def __init__(self, world: hops.HopsWorld, retriever, spec: HopsWarmStartSpec, rng: random.Random):
        self.world, self.retriever, self.spec, self.rng = world, retriever, spec, rng
        self.by_pid = {e.pid: e for kind in world.entities.values() for e in kind}
        self.by_kind = {k: [e.name for e in v] for k, v in world.entities.items()}
        self._hits: Dict[str, list] = {}

    def hits(self, query: str) -> list:
        if query not in self._hits:
            self._hits[query] = self.retriever.retrieve([query], self.spec.topk)[0]
        return self._hits[query]

    def _guess(self, kind: str, avoid: str, context: Sequence[str]) -> str:
        """A wrong entity of ``kind``: one the context names when there is one, else any."""
        shown = [n for n in self.by_kind[kind] if n != avoid and any(f" {n}" in c for c in context)]
        return self.rng.choice(shown or [n for n in self.by_kind[kind] if n != avoid])

    def walk(self, ex) -> Tuple[List[hops.Entity], Tuple[str, ...]]:
        """The chain of ``ex`` (start, ..., answer) and the links followed."""
        attrs = hops.QTYPES[ex.extra["qtype"]][1]
        walk = [self.by_pid[p] for p in ex.extra["support"]]
        return walk + [walk[-1].attrs[attrs[-1]]], attrs

    def chain(self, walk, attrs, hops_done: int, swap_value: Optional[str] = None):
        """The first ``hops_done`` searches of the chain, done right, and what the last of them
        read (``swap_value``: the last passage states that instead).  Returns (turns, thought,
        value): the next action starts from ``thought`` (the fact just read) and ``value``."""
        out, thought, value = [], f"I need to search {_name(walk[0])}.", None
        for hop in range(hops_done):
            x, attr = walk[hop], attrs[hop]
            obs = search_observation(self.hits(x.name))
            value = walk[hop + 1].name
            if hop == hops_done - 1 and swap_value is not None:
                obs, value = obs.replace(f" {value}.", f" {swap_value}."), swap_value
            out.append((_search(thought, x.name), x.name, obs))
            thought = _fact(attr, x, value) + ". "
            if hop < hops_done - 1:
                thought += f"I need to search {_name(walk[hop + 1])}."
        return out, thought, value

    def demonstration(self, ex) -> Tuple[str, List[Tuple[str, Optional[str], Optional[str]]]]:
        """(question, turns) of a demonstration of the warm start's behaviour (reads right, searches
        too little)."""
        return ex.question, self.turns(ex)

    def turns(self, ex) -> List[Tuple[str, Optional[str], Optional[str]]]:
        """The turns of a demonstration of ``ex``."""
        s, rng = self.spec, self.rng
        walk, attrs = self.walk(ex)
        gold, kind = walk[-1].name, walk[-1].kind
        if rng.random() < s.p_memory:
            return [(_answer("", self._guess(kind, gold, [])), None, None)]
        depth = 1
        while depth < len(attrs) and rng.random() < s.p_continue:
            depth += 1
        bad = [h for h in range(depth) if rng.random() < s.p_bad_query and " " in walk[h].name]
        if bad:                                     # a search with the first word of the name, then a guess
            out, thought, _ = self.chain(walk, attrs, bad[0])
            q = walk[bad[0]].name.split(" ")[0]
            obs = search_observation(self.hits(q))
            first = f"I need to search {_name(walk[0])}." if bad[0] == 0 else thought + f"I need to search {q}."
            out.append((_search(first, q), q, obs))
            return out + [(_answer("", self._guess(kind, gold, [o for _, _, o in out])), None, None)]
        swap = self._guess(kind, gold, []) if depth == len(attrs) and rng.random() < s.swap_share else None
        out, fact, value = self.chain(walk, attrs, depth, swap)
        if depth == len(attrs):
            return out + [(_answer(fact, value), None, None)]
        # stopping early, the thought goes straight to a guess: a stated fact is always followed by
        # the next search or, after the chain's last link, by its value as the answer
        return out + [(_answer("", self._guess(kind, gold, [o for _, _, o in out])), None, None)]

    def reading(self, ex) -> Tuple[str, List[Tuple[str, Optional[str], Optional[str]]]]:
        """A reading example: the chain searched right up to a random hop whose passage states
        another value of the right kind, and the next action built on that value (the next
        search, or the answer)."""
        walk, attrs = self.walk(ex)
        hop = self.rng.randrange(len(attrs))
        true = walk[hop + 1]
        value = self._guess(true.kind, true.name, [])
        out, fact, _ = self.chain(walk, attrs, hop + 1, value)
        if hop == len(attrs) - 1:
            return ex.question, out + [(_answer(fact, value), None, None)]
        nxt = value if true.kind != "landmark" else f"the {value}"
        return ex.question, out + [(_search(fact + f"I need to search {nxt}.", value), value, None)]

    def copying(self, ex) -> Tuple[str, List[Tuple[str, Optional[str], Optional[str]]]]:
        """A copy example: ``ex``'s question about a random entity of its start kind, and the
        first search (only copying the name from the question predicts it)."""
        kind, _, templates = hops.QTYPES[ex.extra["qtype"]]
        e = self.rng.choice(self.world.entities[kind])
        return templates[0].format(hops._display(e)), [(_search(f"I need to search {_name(e)}.", e.name), e.name, None)]


def build_rows(tokenizer, make, examples, count: int, spec: HopsWarmStartSpec, rng: random.Random):
    """Token ids + action mask of ``count`` examples ``make(ex) -> (question, turns)`` (``ex``
    cycles through ``examples`` in a shuffled order), laid out as rollouts lay them out."""
    order = list(examples)
    rows = []
    while len(rows) < count:
        rng.shuffle(order)
        for ex in order[: count - len(rows)]:
            question, turns = make(ex)
            ids = tokenizer(build_prompt(question, tokenizer), add_special_tokens=False)["input_ids"]
            mask = [False] * len(ids)
            for action, _, obs in turns:
                a = tokenizer(action, add_special_tokens=False)["input_ids"]
                ids, mask = ids + a, mask + [True] * len(a)
                if obs is not None:
                    o = tokenizer(obs, add_special_tokens=False)["input_ids"][: spec.max_obs_tokens]
                    ids, mask = ids + o, mask + [False] * len(o)
            rows.append((ids, mask))
    return rows


def build_hops_warm_start(out_dir: str, spec: HopsWarmStartSpec = HopsWarmStartSpec(), progress: bool = True) -> str:
    """Build tokenizer + model, fine-tune on demonstrations, save to ``out_dir`` (fp32; replaced
    whole once the build is done)."""
    with staged_folder(out_dir) as tmp:
        _build(tmp, spec, progress)
    return out_dir


def _build(tmp: str, spec: HopsWarmStartSpec, progress: bool) -> None:
    torch.manual_seed(spec.seed)
    world = hops.build()
    examples = world.practice()
    if spec.max_questions:
        examples = examples[: spec.max_questions]
    retriever = InProcessRetriever.from_dir(bundled_index("bm25", hops.WORLD))
    demo = Demonstrator(world, retriever, spec, random.Random(spec.seed))
    sample = [a for ex in examples[:3000] for a, _, _ in demo.turns(ex)]       # the thoughts' wording
    spec = replace(spec, model=warm_model(spec.model, spec.seed))       # as built (and recorded)
    build_tiny_model(tmp, world_texts(world=hops.WORLD) + sample, spec.model)
    tok = load_tokenizer(tmp)
    model = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
    rng = random.Random(spec.seed + 1)
    copies = build_rows(tok, demo.copying, examples, spec.copy_examples, spec, rng)
    reading = build_rows(tok, demo.reading, examples, spec.reading_examples, spec, rng)
    rows = build_rows(tok, demo.demonstration, examples, spec.demos_per_question * len(examples), spec, rng)
    losses = sft(model, [("copy", copies, spec.copy_batch_size, spec.copy_first_batches),
                         ("read", reading, spec.reading_batch_size, spec.reading_first_batches),
                         ("demo", rows, spec.batch_size, 0)], spec, tok.pad_token_id, progress)
    tail = {k: sum(v[-20:]) / max(1, len(v[-20:])) for k, v in losses.items()}
    info = {"spec": asdict(spec), "demonstrations": len(rows), "practice_questions": len(examples),
            "copy_examples": len(copies), "reading_examples": len(reading), "last_loss": tail,
            "search_first_prob": search_first_prob(model, tok, examples)}
    model.save_pretrained(tmp)
    with open(os.path.join(tmp, "warmstart.json"), "w") as f:
        json.dump(info, f, indent=1)


def _parse(tp: type, text: str):
    """A ``--set`` value as the field's type (``true`` / ``false`` for a flag)."""
    if tp is bool:
        if text.lower() not in ("true", "false"):
            raise SystemExit(f"--set: expected true or false, got {text!r}")
        return text.lower() == "true"
    return tp(text)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=HopsWarmStartSpec.epochs)
    ap.add_argument("--max-questions", type=int, default=0)
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="any HopsWarmStartSpec field, e.g. --set p_continue=0.3, or of its model, e.g. "
                         "--set model.num_layers=2 (repeatable)")
    args = ap.parse_args(argv)
    fields = {f: type(v) for f, v in asdict(HopsWarmStartSpec()).items() if f != "model"}
    model_fields = {f"model.{f}": type(v) for f, v in asdict(WARM_MODEL).items() if f != "seed"}
    kw = {"seed": args.seed, "epochs": args.epochs, "max_questions": args.max_questions}
    model_kw = {}
    for item in args.set:
        k, _, v = item.partition("=")
        if k in fields:
            kw[k] = _parse(fields[k], v)
        elif k in model_fields:
            model_kw[k[len("model."):]] = _parse(model_fields[k], v)
        else:
            ap.error(f"--set {item}: unknown field {k!r} (known: {', '.join([*fields, *model_fields])})")
    kw["model"] = replace(WARM_MODEL, **model_kw)
    print(build_hops_warm_start(args.out, HopsWarmStartSpec(**kw)))


if __name__ == "__main__":
    main()
