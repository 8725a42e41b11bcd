"""Where models come from: a hub name, a local folder, or a bundled policy.

* ``bundled:warmstart``: the embedded world's warm-start policy (a 1.3M-parameter Qwen2 that
  follows the protocol and can search and read, but mostly answers from memory: greedy, it never
  searches), shipped in ``tspo_fast/world/warm_policy``; rebuilt into the cache
  (``tspo_fast.world.warmstart``, about 15 minutes with a progress bar) if the shipped copy is missing.
* ``bundled:tiny``: a random tiny Qwen2 with a tokenizer trained on the world (tests, benchmarks).
"""
from __future__ import annotations

import os
from typing import Tuple

BUNDLED_TINY = "bundled:tiny"
BUNDLED_WARMSTART = "bundled:warmstart"
BUNDLED = (BUNDLED_WARMSTART, BUNDLED_TINY)


def cache_dir() -> str:
    """``$TSPO_FAST_CACHE`` or ``~/.cache/tspo-fast``: where built models and indexes live."""
    return os.environ.get("TSPO_FAST_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "tspo-fast"))


def world_texts(limit: int = 4000):
    """Lines of the bundled world (passages and questions) to train the tiny tokenizer on."""
    import json

    from .world import corpus_path, qa_path
    texts = []
    with open(corpus_path(), encoding="utf-8") as f:
        texts += [json.loads(line)["contents"] for line in f if line.strip()]
    from .data import load_examples
    texts += [ex.prompt() + " <answer> " + ex.aliases[0] + " </answer>" for ex in load_examples(qa_path("train"))[:limit]]
    return texts


def resolve_model_path(path: str) -> str:
    """A folder or hub id for ``path``; bundled policies resolve to their folder (built once if needed)."""
    if path == BUNDLED_WARMSTART:
        return warm_start_path()
    if path != BUNDLED_TINY:
        if path.startswith("bundled:"):
            raise ValueError(f"model.path: unknown bundled model {path!r}; the bundled ones are {', '.join(BUNDLED)}")
        return path
    folder = os.path.join(cache_dir(), "tiny-qwen2-v1")
    if not os.path.exists(os.path.join(folder, "config.json")):
        from .tiny_model import TinyModelSpec, build_tiny_model
        tmp = folder + f".tmp{os.getpid()}"
        build_tiny_model(tmp, world_texts(), TinyModelSpec(hidden_size=128, num_layers=2, num_heads=4,
                                                           num_kv_heads=2, intermediate_size=384,
                                                           max_position_embeddings=2048, vocab_target=2048))
        os.makedirs(os.path.dirname(folder), exist_ok=True)
        try:
            os.replace(tmp, folder)
        except OSError:  # another process built it first
            import shutil
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def load_tokenizer(path: str):
    """One tokenizer class everywhere: the folder's ``tokenizer.json`` ids as they are."""
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "tokenizer.json")):
        from transformers import PreTrainedTokenizerFast
        tok = PreTrainedTokenizerFast.from_pretrained(path)
    else:
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(path: str, dtype: str = "float32"):
    import torch
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))


def load_policy(path: str, dtype: str = "float32") -> Tuple[str, object, object]:
    """(resolved folder, tokenizer, causal LM)."""
    folder = resolve_model_path(path)
    return folder, load_tokenizer(folder), load_causal_lm(folder, dtype)


def warm_start_path() -> str:
    """The shipped warm-start policy, or (if it is missing) one built into the cache once."""
    from .world import WARM_POLICY_DIR
    if os.path.exists(os.path.join(WARM_POLICY_DIR, "config.json")):
        return WARM_POLICY_DIR
    folder = os.path.join(cache_dir(), "warmstart-v2")
    if not os.path.exists(os.path.join(folder, "config.json")):
        import sys
        from .world.warmstart import build_warm_start
        print(f"building the warm-start policy into {folder} (about 15 minutes on 2 CPU cores)", file=sys.stderr)
        os.makedirs(os.path.dirname(folder), exist_ok=True)
        build_warm_start(folder, progress=True)
    return folder
