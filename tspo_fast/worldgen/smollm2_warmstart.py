"""The protocol warm start of SmolLM2-135M-Instruct: a LoRA adapter supervised on demonstrations.

``python -m tspo_fast.worldgen.smollm2_warmstart --out DIR`` writes what ``bundled:smollm2-warmstart``
ships in ``tspo_fast/world/smollm2_warm`` (``adapter_config.json``, ``adapter_model.safetensors``,
``warmstart.json``).  It needs the ``smollm2`` extra (the GGUF file) and PEFT (the ``lora`` extra).

Zero-shot, the pretrained model does not follow the Search-R1 protocol (12% valid actions, no
reward in any group), so RL has nothing to start from.  One short supervised stage fixes the
format and nothing more:

* demonstrations of the protocol (think, search, read, answer) for questions of the bundled
  world's **training split**, built by :mod:`tspo_fast.worldgen.warmstart`'s machinery and laid
  out exactly as rollouts lay them out (the chat-templated prompt, then per turn the action ids
  and the ids of the observation the real BM25 retriever returns, cut at ``max_obs_tokens``);
* the loss on the action tokens only (observations and prompt masked, as in RL), LoRA adapters
  (rank ``rank``) on the attention and MLP projections of the top ``lora_layers`` layers (16 of 30): the
  layers below get no gradient, so the backward pass stops there;
* the behaviours mixed as the tiny warm start's last stage mixes them, less its wrong reads
  (``SMOL_BEHAVIOURS``): a share ``memory_share`` of the demonstrations answer from memory
  without searching (with a wrong value of the right type), the rest search the right entities
  and read the answer (``good``), with some wrong queries;
* ``reading`` reading examples (:func:`~tspo_fast.worldgen.warmstart.reading_examples`: the
  last passage states another value, which is the answer) with the loss on the answer alone, so
  they teach reading what was retrieved without teaching to search.

So the warm start follows the protocol and reads what it retrieves, but opens with a search only
some of the time (its ``search_first_prob`` is written to ``warmstart.json``): greedy decoding
mostly answers from memory, sampled rollouts search now and then and are rewarded when they do.
What RL has to learn is to search, as Search-R1 and TSPO do for an instruction-tuned model.
Every random choice (examples, behaviours, batch order, LoRA initialisation) comes from ``--seed``.

The first build (128 demonstrations, the tiny warm start's behaviours with its wrong reads, no
reading examples) searched once its RL run had made it search, but read almost nothing it
retrieved (rollout EM 0-0.03 with the answer retrieved in up to a third of trajectories), so RL
learnt to search more and never to answer: the wrong reads and the reading examples are the change.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import time
from dataclasses import asdict, dataclass, replace
from typing import Dict, List, Tuple

import torch

from ..data import load_examples
from ..models import SMOLLM2, load_causal_lm, load_tokenizer, resolve_model_path
from ..retrieval import InProcessRetriever
from ..retrieval.bundled import bundled_index
from ..training.checkpoint import staged_folder
from ..world import qa_path
from .warmstart import (
    BEHAVIOURS,
    WarmStartSpec,
    _passages,
    build_examples,
    habit_behaviours,
    reading_examples,
    search_first_prob,
    sft,
)

__all__ = ["SMOL_BEHAVIOURS", "SmolWarmStartSpec", "answer_only", "build_smollm2_warm_start", "main"]

#: the tiny warm start's behaviours less ``wrong_answer`` (a right search, then a wrong read): a
#: pretrained model taught to misread a third of what it retrieves reads almost nothing
SMOL_BEHAVIOURS = tuple((b, w) for b, w in BEHAVIOURS if b != "wrong_answer")


@dataclass(frozen=True)
class SmolWarmStartSpec:
    base: str = SMOLLM2             # the model adapted (a model.path; tests use bundled:tiny)
    seed: int = 0
    questions: int = 128            # training-split questions demonstrated (one demonstration each)
    memory_share: float = 0.6       # share of demonstrations that answer from memory without searching
    reading: int = 128              # reading examples (loss on the answer only)
    rank: int = 8                   # LoRA rank (the adapter: 30 x 7 projections of the top layers)
    alpha: float = 16.0
    lora_layers: int = 16           # adapters on the top this-many decoder layers (of 30): no backward below
    lr: float = 2e-3                # the peak; the shared loop (warmstart.sft) decays from half of it, 1e-3
    epochs: int = 2
    batch_size: int = 8
    max_obs_tokens: int = 128       # what configs/smollm2.yaml's rollout keeps of an observation
    topk: int = 2                   # configs/smollm2.yaml's retrieval.topk
    threads: int = 0                # torch threads (0: torch's default)
    probe_questions: int = 40       # test questions the search-first probability is measured on


def answer_only(rows: List[Tuple[List[int], List[bool]]]) -> List[Tuple[List[int], List[bool]]]:
    """Each row's action mask cut to its last action (the tokens after the last masked-out one)."""
    out = []
    for ids, mask in rows:
        last = max((i for i, m in enumerate(mask) if not m), default=-1)
        out.append((ids, [m and i > last for i, m in enumerate(mask)]))
    return out


def _lora(lm, spec: SmolWarmStartSpec):
    import peft
    layers = lm.config.num_hidden_layers
    cfg = peft.LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                          layers_to_transform=list(range(layers - min(spec.lora_layers, layers), layers)))
    return peft.get_peft_model(lm, cfg)


def action_loss(model, ids: torch.Tensor, att: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy on the action tokens: the head runs on those positions only
    (a 49k-row head over every position would cost a quarter of the model's compute)."""
    base = model.get_base_model()
    h = base.model(input_ids=ids, attention_mask=att).last_hidden_state
    sel = mask[:, 1:]
    logits = base.lm_head(h[:, :-1][sel]).float()
    return torch.nn.functional.cross_entropy(logits, ids[:, 1:][sel])


def build_smollm2_warm_start(out_dir: str, spec: SmolWarmStartSpec = SmolWarmStartSpec(),
                             progress: bool = True) -> str:
    """Fine-tune LoRA adapters of SmolLM2-135M-Instruct on demonstrations; write the adapter and
    ``warmstart.json`` (the spec, losses, search-first probability before and after) to ``out_dir``."""
    t0 = time.time()
    if spec.threads:
        torch.set_num_threads(spec.threads)
    torch.manual_seed(spec.seed)
    base = resolve_model_path(spec.base)
    tok = load_tokenizer(base)
    lm = load_causal_lm(base)
    retriever = InProcessRetriever.from_dir(bundled_index("bm25"))
    train = load_examples(qa_path("train"))
    examples = list(train)
    random.Random(spec.seed).shuffle(examples)
    examples = examples[:spec.questions]
    held_out = load_examples(qa_path("test"))[:spec.probe_questions]
    passages = _passages()
    demo_spec = replace(WarmStartSpec(), seed=spec.seed, demos_per_question=1, max_obs_tokens=spec.max_obs_tokens,
                        topk=spec.topk)
    rows = build_examples(tok, retriever, examples, demo_spec, passages,
                          habit_behaviours(spec.memory_share, SMOL_BEHAVIOURS))
    reading = answer_only(reading_examples(tok, retriever, train, passages, spec.reading, spec.seed, demo_spec))
    before = search_first_prob(lm, tok, held_out)
    model = _lora(lm, spec)
    parts = [("demo", rows, spec.batch_size, 0)] + ([("reading", reading, spec.batch_size, 0)] if reading else [])
    by_kind = sft(model, parts, spec, tok.pad_token_id, progress, loss_fn=action_loss)
    losses = by_kind["demo"]
    after = search_first_prob(model, tok, held_out)
    k = max(1, len(losses) // 10)
    info: Dict[str, object] = {
        "spec": asdict(spec), "demonstrations": len(rows),
        "demonstration_tokens": sum(len(x) for x, _ in rows), "action_tokens": sum(sum(m) for _, m in rows),
        "reading_examples": len(reading), "steps": sum(len(v) for v in by_kind.values()),
        "first_loss": sum(losses[:k]) / k, "last_loss": sum(losses[-k:]) / k,
        **({"reading_first_loss": sum(by_kind["reading"][:k]) / k, "reading_last_loss": sum(by_kind["reading"][-k:]) / k}
           if reading else {}),
        "search_first_prob_base": before, "search_first_prob": after,
        "build_seconds": round(time.time() - t0, 1), "torch_threads": torch.get_num_threads()}
    for cfg in model.peft_config.values():          # the base by its name, not this machine's cache path
        cfg.base_model_name_or_path = spec.base
    with staged_folder(out_dir) as tmp:
        model.save_pretrained(tmp)
        for leftover in ("README.md",):                      # PEFT's model card template: nothing of ours
            if os.path.exists(os.path.join(tmp, leftover)):
                os.remove(os.path.join(tmp, leftover))
        with open(os.path.join(tmp, "warmstart.json"), "w") as f:
            json.dump(info, f, indent=1)
    return out_dir


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=SmolWarmStartSpec.seed)
    ap.add_argument("--questions", type=int, default=SmolWarmStartSpec.questions)
    ap.add_argument("--epochs", type=int, default=SmolWarmStartSpec.epochs)
    ap.add_argument("--memory-share", type=float, default=SmolWarmStartSpec.memory_share)
    ap.add_argument("--reading", type=int, default=SmolWarmStartSpec.reading)
    args = ap.parse_args(argv)
    spec = SmolWarmStartSpec(seed=args.seed, questions=args.questions, epochs=args.epochs,
                             memory_share=args.memory_share, reading=args.reading)
    print(build_smollm2_warm_start(args.out, spec))


if __name__ == "__main__":
    main()
