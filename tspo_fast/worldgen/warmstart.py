"""The embedded world's warm-start policy: a tiny Qwen2 supervised on protocol demonstrations.

``python -m tspo_fast.worldgen.warmstart --out DIR`` (15 minutes on 2 CPU cores) writes what
``bundled:warmstart`` ships in ``tspo_fast/world/warm_policy``.  Every random choice (tokenizer
corpus order, initialisation, examples, batch order) comes from ``--seed``; two builds on one
machine and torch version should agree bit for bit (not checked for the shipped weights).

1. a byte-level BPE tokenizer trained on the world's passages and prompts, with a vocabulary
   (4096) large enough that every entity name is a single token;
2. a small Qwen2-architecture model (1.3M parameters, 4 layers, head size 32 so that vLLM's
   CPU backend runs it);
3. supervised fine-tuning on the action tokens (observations masked, as in RL) of, in order:
   * *copy examples*: a prompt whose question names a random entity of the right kind, and the
     first search for that entity.  Trained on real questions alone the model memorises a few
     names and never copies; these teach it to copy (held-out accuracy in ``warmstart.json``);
   * *reading examples*: one- and two-hop episodes whose last retrieved passage states a
     different answer of the right type, demonstrated as the answer: no memorised fact
     predicts it, reading does;
   * *demonstrations* of the protocol (think, search, read, answer) for every question of the
     world that the test split does not ask (``generate.practice_questions``), laid out exactly
     as rollouts lay them out (prompt, then per turn the action ids and the observation ids the
     real BM25 retriever returns), with the rest of the copy and reading examples mixed in;
4. a brief last stage (one demonstration per question, lower rate) in which most demonstrations
   (``memory_share``, 0.55) answer from memory without searching, with a wrong value of the
   right type: the habit of a model that was never taught to use its tool.

The demonstrations are deliberately imperfect: some search the wrong entity, some read the
right passage but answer with a wrong value of the right type, some answer without searching.
After stage 3 the policy searches first with probability 0.95 and, greedy on the first 100
test questions, reaches EM 0.44 (answer retrieved 0.91).  Stage 4 turns that around: the shipped
policy opens with a search with probability 0.25 (``search_first_prob`` in ``warmstart.json``),
so greedy decoding never searches (test EM 0.06, its memory guesses) while sampled rollouts do now
and then, and when they do they often retrieve the answer but read it wrongly.  Whole groups of
rollouts then fail although some of them retrieved the answer: the case FOLR is for.  RL has
to teach the policy to search, as Search-R1 and TSPO do for an instruction-tuned model.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
from dataclasses import asdict, dataclass, replace
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM

from ..models import world_texts
from ..models.tiny import TinyModelSpec, build_tiny_model, load_tokenizer
from ..protocol import build_prompt, search_observation
from ..retrieval import InProcessRetriever
from ..retrieval.bundled import bundled_index
from ..training.checkpoint import staged_folder
from ..world import corpus_path
from .generate import practice_questions

BEHAVIOURS = (("good", 0.45), ("wrong_answer", 0.20), ("wrong_query", 0.20), ("no_search", 0.15))


def habit_behaviours(memory_share: float, behaviours: Sequence[Tuple[str, float]] = BEHAVIOURS
                     ) -> Tuple[Tuple[str, float], ...]:
    """``behaviours`` with ``no_search`` (answer from memory) at ``memory_share``, the others rescaled."""
    rest = [(b, w) for b, w in behaviours if b != "no_search"]
    total = sum(w for _, w in rest)
    return tuple((b, w * (1.0 - memory_share) / total) for b, w in rest) + (("no_search", memory_share),)


#: the warm-start policies' shape (1.3M parameters; head size 32, which vLLM's CPU backend runs) and a
#: vocabulary large enough that every entity name is one BPE token
WARM_MODEL = TinyModelSpec(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=384,
                           vocab_target=4096)


def warm_model(model: TinyModelSpec, seed: int) -> TinyModelSpec:
    """``model`` initialised from the build's ``seed`` (every random choice of a build comes from it)."""
    return replace(model, seed=seed)


@dataclass(frozen=True)
class WarmStartSpec:
    seed: int = 0                   # every random choice, the model's initialisation included
    model: TinyModelSpec = WARM_MODEL  # tokenizer vocabulary and model shape (its own seed is replaced by ``seed``)
    copy_examples: int = 16000       # first turns naming a random entity of the question's kind
    copy_batch_size: int = 32
    copy_first_batches: int = 300    # copy batches alone before the demonstrations join in
    reading_examples: int = 8000     # episodes whose last passage states another answer
    reading_batch_size: int = 16
    reading_first_batches: int = 300  # reading batches alone, after the first copy batches
    demos_per_question: int = 2
    epochs: int = 1
    batch_size: int = 16
    lr: float = 3e-3
    max_obs_tokens: int = 200
    topk: int = 3
    max_questions: int = 0          # 0: every training question (smaller for smoke tests)
    memory_share: float = 0.55      # last stage: share of demonstrations answered from memory (0: no stage)
    habit_lr: float = 1e-3


def _passages() -> Dict[str, Tuple[str, str]]:
    out = {}
    with open(corpus_path(), encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                title, _, text = row["contents"].partition("\n")
                out[str(row["id"])] = (title.strip().strip('"'), text)
    return out


#: the kind of entity each question type names (it is the title of the question's first support passage)
QTYPE_KIND = {"birthyear": "person", "birthplace": "person", "birthplace_country": "person",
              "birthplace_river": "person", "founder": "company", "hq": "company", "company_year": "company",
              "founder_birthyear": "company", "founder_birthplace": "company", "hq_country": "company",
              "city_river": "city", "city_country": "city", "capital": "country", "capital_founded": "country",
              "capital_river": "country"}


def passage_kind(title: str, text: str) -> str:
    """person / company / city / country / river, read off a bundled passage's wording."""
    if title.endswith(" River"):
        return "river"
    if "born" not in text:
        for kind, cue in (("country", "country whose capital"), ("company", " company"), ("city", " city")):
            if cue in text:
                return kind
    return "person"


def copy_examples(tokenizer, examples, passages, count: int, seed: int):
    """Prompt + first search action, with the question's entity swapped for a random one.

    The question names a random entity of the right kind, so the only way to predict the query
    is to copy it from the question: this is what teaches the small model to copy names (trained
    on the real questions alone, it memorises a few names instead).
    """
    rng = random.Random(seed)
    pools: Dict[str, List[str]] = {}
    for title, text in passages.values():
        pools.setdefault(passage_kind(title, text), []).append(title)
    slots = []
    for ex in examples:
        support = [str(x) for x in ex.extra.get("support", [])]
        kind = QTYPE_KIND.get(ex.extra.get("qtype", ""))
        if support and kind and support[0] in passages and passages[support[0]][0] in ex.question:
            slots.append((ex.question.replace(passages[support[0]][0], "{}"), kind))
    rows = []
    for _ in range(count):
        template, kind = rng.choice(slots)
        name = rng.choice(pools[kind])
        ids = tokenizer(build_prompt(template.format(name), tokenizer), add_special_tokens=False)["input_ids"]
        act = tokenizer(_action(name), add_special_tokens=False)["input_ids"]
        rows.append((ids + act, [False] * len(ids) + [True] * len(act)))
    return rows


def reading_examples(tokenizer, retriever, examples, passages, count: int, seed: int, spec: "WarmStartSpec"):
    """Episodes (one search per hop) whose last support passage states a *different* answer.

    Each hop's passage is retrieved as usual, but in the last one the answer (say a birth year)
    is replaced by another value of the same question type, and the demonstrated answer is that
    value: no memorised fact predicts it, only reading the passage does.  Loss on every action.
    """
    rng = random.Random(seed)
    usable = []
    for ex in examples:
        support = [str(x) for x in ex.extra.get("support", [])]
        if support and all(x in passages for x in support) and f" {ex.aliases[0]}" in passages[support[-1]][1]:
            usable.append((ex, support))
    values: Dict[str, List[str]] = {}
    for ex, _ in usable:
        values.setdefault(ex.extra["qtype"], [])
        if ex.aliases[0] not in values[ex.extra["qtype"]]:
            values[ex.extra["qtype"]].append(ex.aliases[0])
    hits: Dict[str, list] = {}
    rows = []
    for _ in range(count):
        ex, support = rng.choice(usable)
        gold, last = ex.aliases[0], support[-1]
        value = rng.choice([v for v in values[ex.extra["qtype"]] if v != gold] or [gold])
        ids = tokenizer(build_prompt(ex.question, tokenizer), add_special_tokens=False)["input_ids"]
        mask = [False] * len(ids)
        for pid in support:
            title = passages[pid][0]
            if title not in hits:
                hits[title] = retriever.retrieve([title], spec.topk)[0]
            docs = [dict(h, document=dict(h["document"], contents=h["document"]["contents"].replace(f" {gold}", f" {value}")))
                    if str(h["document"]["id"]) == last else h for h in hits[title]]
            a = tokenizer(_action(title), add_special_tokens=False)["input_ids"]
            o = tokenizer(search_observation(docs), add_special_tokens=False)["input_ids"][: spec.max_obs_tokens]
            ids, mask = ids + a + o, mask + [True] * len(a) + [False] * len(o)
        b = tokenizer(_answer(value), add_special_tokens=False)["input_ids"]
        rows.append((ids + b, mask + [True] * len(b)))
    return rows


def _action(query: str) -> str:
    return f"<think> I need to search {query}. </think>\n<search> {query} </search>"


def _answer(ans: str) -> str:
    return f"<think> The answer is {ans}. </think>\n<answer> {ans} </answer>"


def demonstration(ex, passages, others: Sequence[str], rng: random.Random,
                  behaviours: Sequence[Tuple[str, float]] = BEHAVIOURS) -> List[Tuple[str, Optional[str]]]:
    """A list of (action text, search query or None) turns for one question."""
    support = [str(s) for s in ex.extra.get("support", [])]
    titles = [passages[s][0] for s in support if s in passages]
    behaviour = rng.choices([b for b, _ in behaviours], weights=[w for _, w in behaviours])[0]
    gold = ex.aliases[0]
    wrong = rng.choice([o for o in others if o != gold] or [gold])
    if behaviour == "no_search" or not titles:
        return [(_answer(wrong), None)]
    if behaviour == "wrong_query":
        q = rng.choice([t for t in (rng.choice(list(passages.values()))[0] for _ in range(3)) if t not in titles]
                       or [titles[0]])
        return [(_action(q), q), (_answer(wrong), None)]
    turns = [(_action(t), t) for t in titles]
    return turns + [(_answer(gold if behaviour == "good" else wrong), None)]


def build_examples(tokenizer, retriever, examples, spec: WarmStartSpec, passages=None,
                   behaviours: Sequence[Tuple[str, float]] = BEHAVIOURS):
    """Token ids + action mask of every demonstration, laid out as rollouts lay them out."""
    rng = random.Random(spec.seed)
    passages = passages or _passages()
    by_type: Dict[str, List[str]] = {}
    for ex in examples:
        by_type.setdefault(ex.extra.get("qtype", ex.data_source), []).append(ex.aliases[0])
    rows = []
    for _ in range(spec.demos_per_question):
        for ex in examples:
            turns = demonstration(ex, passages, by_type[ex.extra.get("qtype", ex.data_source)], rng, behaviours)
            ids = tokenizer(build_prompt(ex.question, tokenizer), add_special_tokens=False)["input_ids"]
            mask = [False] * len(ids)
            for action, query in turns:
                a = tokenizer(action, add_special_tokens=False)["input_ids"]
                ids, mask = ids + a, mask + [True] * len(a)
                if query is not None:
                    obs = search_observation(retriever.retrieve([query], spec.topk)[0])
                    o = tokenizer(obs, add_special_tokens=False)["input_ids"][: spec.max_obs_tokens]
                    ids, mask = ids + o, mask + [False] * len(o)
            rows.append((ids, mask))
    rng.shuffle(rows)
    return rows


def _batches(rows, batch_size: int) -> List[List[int]]:
    """Index batches of similar length (little padding)."""
    by_len = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
    return [by_len[b:b + batch_size] for b in range(0, len(by_len), batch_size)]


def lm_loss(model, ids: torch.Tensor, att: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of a causal LM on the action tokens (``mask``, bool [B, L])."""
    return model(input_ids=ids, attention_mask=att, labels=torch.where(mask, ids, -100)).loss


def sft(model, parts, spec, pad_id: int, progress: bool = True,
        loss_fn: Callable[..., torch.Tensor] = lm_loss) -> Dict[str, List[float]]:
    """Next-token cross-entropy on action tokens: the one supervised loop of every warm start.

    ``spec``: a warm-start spec (``seed``, ``epochs``, ``lr``); ``loss_fn(model, ids, att, mask)``:
    the loss of a padded batch (``mask``: its action tokens), :func:`lm_loss` by default.  The
    parameters that require a gradient are trained (all of them, or a LoRA adapter's).

    ``parts``: ``(kind, rows, batch_size, first_batches)`` in order.  First, each part's
    ``first_batches`` batches alone, one part after the other, at the full learning rate: the
    copy examples teach the model to copy names, then the reading examples to read answers out
    of passages (mixed in from the start, the demonstrations teach it to memorise instead).
    Then ``spec.epochs`` epochs in which every part's remaining rows (demonstrations: all of
    them each epoch; the others: a fresh share per epoch) come in shuffled batches of similar
    length, at a cosine-decaying rate from half the peak.  Returns the losses of each kind.
    """
    torch.manual_seed(spec.seed)
    rows: List[Tuple[List[int], List[bool]]] = []
    plan: List[Tuple[str, List[int]]] = []
    later = []
    for kind, part, bs, first in parts:
        base = len(rows)
        rows += list(part)
        n = min(len(part), first * bs)
        plan += [(kind, list(range(base + b, base + min(n, b + bs)))) for b in range(0, n, bs)]
        later.append((kind, list(range(base + n, base + len(part))), bs, first == 0))
    n_first = len(plan)
    for epoch in range(spec.epochs):
        epoch_batches = []
        for kind, idx, bs, every_epoch in later:
            share = idx if every_epoch else idx[epoch::spec.epochs]
            epoch_batches += [(kind, [share[i] for i in b]) for b in _batches([rows[i] for i in share], bs)]
        random.Random(spec.seed + epoch).shuffle(epoch_batches)
        plan += epoch_batches
    steps, warm = len(plan), 30

    def lr_factor(s: int) -> float:   # warm-up, full rate while copying is learnt, then cosine from half
        if s < n_first:
            return min(1.0, (s + 1) / warm)
        t = (s - n_first) / max(1, steps - n_first)
        return 0.5 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    model.train()
    losses: Dict[str, List[float]] = {kind: [] for kind, *_ in parts}
    bar = tqdm(total=steps, desc="warm-start SFT", disable=not progress)
    for kind, idx in plan:
        batch = [rows[i] for i in idx]
        L = max(len(ids) for ids, _ in batch)
        ids = torch.full((len(batch), L), pad_id, dtype=torch.long)
        att = torch.zeros(len(batch), L, dtype=torch.long)
        mask = torch.zeros(len(batch), L, dtype=torch.bool)
        for i, (x, m) in enumerate(batch):
            ids[i, :len(x)] = torch.tensor(x)
            att[i, :len(x)] = 1
            mask[i, :len(x)] = torch.tensor(m)
        loss = loss_fn(model, ids, att, mask)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses[kind].append(float(loss.detach()))
        bar.update(1)
        bar.set_postfix({kind: f"{losses[kind][-1]:.3f}"})
    bar.close()
    return losses


def copy_accuracy(model, tokenizer, rows, limit: int = 50) -> float:
    """Share of copy examples whose greedy query (after the action's first words) is the name."""
    model.eval()
    head = tokenizer("<think> I need to search", add_special_tokens=False)["input_ids"]
    ok = 0
    with torch.no_grad():
        for ids, mask in rows[:limit]:
            p = mask.index(True)
            target = ids[p + len(head):]
            x = torch.tensor([ids[:p] + head])
            out = model.generate(x, max_new_tokens=len(target), do_sample=False, pad_token_id=tokenizer.pad_token_id)
            ok += out[0, x.shape[1]:].tolist() == target
    model.train()
    return ok / max(1, min(limit, len(rows)))


def search_first_prob(model, tokenizer, examples, limit: int = 200) -> float:
    """Mean probability that the first action searches (" I need to search") rather than answers
    (" The answer is"), right after its opening ``<think>``, over the first ``limit`` prompts."""
    head = tokenizer("<think>", add_special_tokens=False)["input_ids"]
    search = tokenizer(" I", add_special_tokens=False)["input_ids"][0]
    answer = tokenizer(" The", add_special_tokens=False)["input_ids"][0]
    model.eval()
    probs = []
    with torch.no_grad():
        for ex in examples[:limit]:
            ids = tokenizer(build_prompt(ex.question, tokenizer), add_special_tokens=False)["input_ids"] + head
            p = model(torch.tensor([ids])).logits[0, -1].softmax(-1)
            probs.append(float(p[search] / (p[search] + p[answer])))
    model.train()
    return sum(probs) / max(1, len(probs))


def _tail_mean(xs: Sequence[float], k: int = 20) -> float:
    return sum(xs[-k:]) / max(1, min(k, len(xs)))


def build_warm_start(out_dir: str, spec: WarmStartSpec = WarmStartSpec(), progress: bool = True) -> str:
    """Build tokenizer + model, fine-tune on demonstrations, save to ``out_dir`` (fp32; replaced
    whole once the build is done)."""
    with staged_folder(out_dir) as tmp:
        _build(tmp, spec, progress)
    return out_dir


def _build(tmp: str, spec: WarmStartSpec, progress: bool) -> None:
    torch.manual_seed(spec.seed)
    spec = replace(spec, model=warm_model(spec.model, spec.seed))       # as built (and recorded)
    build_tiny_model(tmp, world_texts(), spec.model)
    tok = load_tokenizer(tmp)
    model = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
    retriever = InProcessRetriever.from_dir(bundled_index("bm25"))
    # every question of the world the test split does not ask (the training split included)
    examples = practice_questions()
    if spec.max_questions:
        examples = examples[: spec.max_questions]
    passages = _passages()
    copies = copy_examples(tok, examples, passages, spec.copy_examples, spec.seed) if spec.copy_examples else []
    held_out = copy_examples(tok, examples, passages, 50, spec.seed + 1) if spec.copy_examples else []
    reading = reading_examples(tok, retriever, examples, passages, spec.reading_examples, spec.seed, spec)
    rows = build_examples(tok, retriever, examples, spec, passages)
    losses = sft(model, [("copy", copies, spec.copy_batch_size, spec.copy_first_batches),
                         ("read", reading, spec.reading_batch_size, spec.reading_first_batches),
                         ("demo", rows, spec.batch_size, 0)], spec, tok.pad_token_id, progress)
    searching = search_first_prob(model, tok, examples)
    habit: List[Tuple[List[int], List[bool]]] = []
    if spec.memory_share > 0:
        # the last, brief stage: mostly answer from memory.  Greedy decoding then never searches,
        # sampling still does now and then: RL has to teach the policy to search.
        stage = replace(spec, seed=spec.seed + 1, demos_per_question=1, lr=spec.habit_lr, epochs=1)
        habit = build_examples(tok, retriever, examples, stage, passages, habit_behaviours(spec.memory_share))
        losses.update(sft(model, [("habit", habit, spec.batch_size, 0)], stage, tok.pad_token_id, progress))
    info = {"spec": asdict(spec), "demonstrations": len(rows), "copy_examples": len(copies),
            "reading_examples": len(reading), "first_loss": losses["demo"][0], "last_loss": _tail_mean(losses["demo"]),
            "copy_last_loss": _tail_mean(losses["copy"]) if copies else None,
            "read_last_loss": _tail_mean(losses["read"]) if reading else None,
            "copy_accuracy": copy_accuracy(model, tok, held_out) if held_out else None,
            "habit_demonstrations": len(habit), "search_first_prob_before_habit": searching,
            "search_first_prob": search_first_prob(model, tok, examples)}
    model.save_pretrained(tmp)
    with open(os.path.join(tmp, "warmstart.json"), "w") as f:
        json.dump(info, f, indent=1)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--epochs", type=int, default=WarmStartSpec.epochs)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    print(build_warm_start(args.out, WarmStartSpec(seed=args.seed, epochs=args.epochs)))


if __name__ == "__main__":
    main()
