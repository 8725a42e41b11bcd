"""Tiny Qwen2-architecture models with a real BPE tokenizer, for tests and benchmarks.

``build_tiny_model(folder, texts)`` trains a byte-level BPE tokenizer with ``tokenizers`` on
``texts``, builds a randomly initialised ``Qwen2ForCausalLM`` whose vocabulary covers it (the
vocabulary size is rounded up to a multiple of 64, since vLLM pads vocabularies), and saves
both with ``save_pretrained`` into ``folder``. The folder loads offline with
``transformers`` and with vLLM; the tokenizer is recorded as ``PreTrainedTokenizerFast`` so
that every loader (``AutoTokenizer``, vLLM) uses the same class and the same ids as
``tokenizer.json`` (``Qwen2Tokenizer`` would re-split digits differently).

Byte-level BPE never needs an unknown token: any text, including tags the tokenizer was not
trained on, encodes to some ids.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from .hub import load_tokenizer

__all__ = ["TinyModelSpec", "build_tiny_model", "default_texts", "train_tokenizer", "search_episode_texts",
           "train_tiny_lm", "load_tokenizer", "EOS_TOKEN", "SEARCH_TAGS"]

EOS_TOKEN = "<|endoftext|>"
CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")
# Qwen2's pre-tokenisation regex (digits split one by one).
QWEN2_SPLIT_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
                     r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
SEARCH_TAGS = ("<search>", "</search>", "<answer>", "</answer>", "<information>",
               "</information>", "<think>", "</think>")


@dataclass(frozen=True)
class TinyModelSpec:
    """Shape of the tiny model. vLLM on CPU needs ``hidden_size / num_heads`` in {32, 64, ...}."""

    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 256
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = True
    vocab_target: int = 1024  # BPE trainer target size before rounding up to a multiple of 64
    seed: int = 0


def default_texts() -> list[str]:
    """A few hundred short lines of search-agent-like text for training the tiny tokenizer."""
    facts = [
        ("Paris", "Paris is the capital and largest city of France."),
        ("Berlin", "Berlin is the capital of Germany and its largest city."),
        ("Mount Everest", "Mount Everest is Earth's highest mountain above sea level."),
        ("Python (programming language)", "Python is a high-level programming language."),
        ("Amazon River", "The Amazon River in South America is the largest river by discharge."),
        ("Marie Curie", "Marie Curie was a physicist and chemist who won two Nobel Prizes."),
    ]
    lines = []
    for i in range(40):
        for title, text in facts:
            lines.append(f'"{title}"\n{text}')
            lines.append(f"Question: who or what is {title.lower()}? number {i} of {i * 7 + 3}")
            lines.append(f"I think the answer is {title}. Let me search for it. Doc {i % 3 + 1}")
    lines.append("Answer the given question. You must conduct reasoning first every time you "
                 "get new information. My previous action is invalid. Let me try again.")
    return lines


def train_tokenizer(texts: Iterable[str], vocab_target: int = 1024,
                    include_tags: bool = True):
    """Train a byte-level BPE ``tokenizers.Tokenizer`` on ``texts``.

    ``include_tags`` adds the search/answer tags as single added tokens; with ``False`` they
    are plain text that BPE splits into pieces (the "tags missing from the vocabulary" case).
    """
    # The exact pipeline of transformers' Qwen2Tokenizer, so that loaders which rebuild a
    # Qwen2Tokenizer from vocab + merges (AutoTokenizer on a qwen2 folder, hence vLLM) get the
    # same ids as tokenizer.json.
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    special = [EOS_TOKEN, *CHAT_TOKENS]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_target, special_tokens=special, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    if include_tags:
        tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in SEARCH_TAGS])
    return tok


def build_tiny_model(folder: str, texts: Sequence[str] | None = None,
                     spec: TinyModelSpec | None = None, include_tags: bool = True,
                     dtype: str = "float32") -> str:
    """Build and save a tiny random Qwen2 model + tokenizer into ``folder``; return ``folder``.

    The saved ``config.json`` has ``vocab_size`` = tokenizer size rounded up to a multiple of
    64; ``eos_token_id`` = ``pad_token_id`` = the id of ``<|endoftext|>``.
    """
    spec = spec or TinyModelSpec()
    texts = list(texts) if texts is not None else default_texts()
    raw = train_tokenizer(texts, spec.vocab_target, include_tags=include_tags)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN,
        clean_up_tokenization_spaces=False, model_max_length=spec.max_position_embeddings,
    )
    # A minimal ChatML template, so that code applying chat templates has one to apply.
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    vocab = ((len(tokenizer) + 63) // 64) * 64
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        head_dim=spec.hidden_size // spec.num_heads,
        max_position_embeddings=spec.max_position_embeddings,
        max_window_layers=spec.num_layers,
        tie_word_embeddings=spec.tie_word_embeddings,
        bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id,
        initializer_range=0.1,
    )
    torch.manual_seed(spec.seed)
    model = Qwen2ForCausalLM(config).to(getattr(torch, dtype))
    model.generation_config.eos_token_id = eos_id
    model.generation_config.pad_token_id = eos_id
    model.generation_config.bos_token_id = eos_id
    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    _pin_tokenizer_class(folder)
    return folder


def _pin_tokenizer_class(folder: str) -> None:
    """Record ``PreTrainedTokenizerFast`` in tokenizer_config.json (see module docstring)."""
    path = os.path.join(folder, "tokenizer_config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg["clean_up_tokenization_spaces"] = False
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2)


def search_episode_texts(facts: Sequence[tuple[str, str, str]] | None = None) -> list[str]:
    """Search-R1-shaped episodes (question, search, information, answer) for ``train_tiny_lm``.

    ``facts``: (question, query, answer) triples; a default set is used when None.
    """
    facts = facts or [
        ("What is the capital of France?", "capital of France", "Paris"),
        ("What is the highest mountain?", "highest mountain", "Mount Everest"),
        ("Which river has the largest discharge?", "largest river", "Amazon River"),
        ("Who won two Nobel Prizes?", "two Nobel Prizes", "Marie Curie"),
        ("What is the capital of Germany?", "capital of Germany", "Berlin"),
    ]
    out = []
    for q, query, ans in facts:
        out.append(f"Question: {q}\n<think> I need to search. </think>\n<search> {query} </search>"
                   f"\n\n<information>Doc 1(Title: {ans}) {ans} is the answer.\n</information>\n\n"
                   f"<think> found it. </think>\n<answer> {ans} </answer>{EOS_TOKEN}")
    return out


def train_tiny_lm(folder: str, texts: Sequence[str], steps: int = 150, lr: float = 3e-3,
                  seed: int = 0) -> float:
    """Fit the model in ``folder`` to ``texts`` (plain next-token loss, AdamW) and save it back.

    A few hundred steps make a tiny random model emit the search/answer protocol, so rollouts
    exercise retrieval. Returns the final loss.
    """
    tok = load_tokenizer(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    enc = tok(list(texts), return_tensors="pt", padding=True, add_special_tokens=False)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        loss = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    model.save_pretrained(folder)
    return float(loss.detach())
