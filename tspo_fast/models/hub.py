"""Loading a policy from a folder or hub name: the project's one tokenizer loader and the causal LM."""
from __future__ import annotations

import os

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

__all__ = ["load_tokenizer", "load_causal_lm"]


def load_tokenizer(path: str):
    """The tokenizer of a model folder or hub name, the same class for every user (trainer, HF
    engine, rewards): a folder's ``tokenizer.json`` ids as they are (``PreTrainedTokenizerFast``;
    ``Qwen2Tokenizer`` would re-split digits), else ``AutoTokenizer``.  A missing pad token
    becomes the EOS token."""
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "tokenizer.json")):
        tok = PreTrainedTokenizerFast.from_pretrained(path)
    else:
        tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(path: str, dtype: str = "float32"):
    """``AutoModelForCausalLM`` from ``path`` in ``dtype`` ("float32" | "bfloat16" | "float16")."""
    return AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
