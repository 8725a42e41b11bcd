"""A LoRA adapter folder (PEFT's layout) merged into its base model, without PEFT.

A shipped warm start is a small adapter (``adapter_config.json`` + ``adapter_model.safetensors``)
over a base model; the trainer, vLLM and DeepSpeed want one plain folder.  :func:`merge_adapter`
writes ``W + (alpha / r) * B @ A`` for every adapted linear layer (in float32, then the base's
dtype) and copies the tokenizer files.  Tied input/output embeddings stay tied: an adapter on
``lm_head`` or ``embed_tokens`` is refused rather than silently untying them.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Dict

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

__all__ = ["merge_adapter", "ADAPTER_CONFIG", "ADAPTER_WEIGHTS"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def _lora_pairs(adapter: Dict[str, torch.Tensor], where: str) -> Dict[str, tuple]:
    """{base weight name: (A, B)} from PEFT's saved names (``...q_proj.lora_A.weight``)."""
    pairs: Dict[str, dict] = {}
    for key, t in adapter.items():
        name = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
        for side in ("lora_A", "lora_B"):
            marker = f".{side}."
            if marker in name:
                module = name.split(marker)[0]
                pairs.setdefault(module, {})[side] = t
                break
        else:
            raise ValueError(f"{where}: {key} is not a LoRA A/B weight (only plain LoRA adapters are merged)")
    out = {}
    for module, ab in pairs.items():
        if set(ab) != {"lora_A", "lora_B"}:
            raise ValueError(f"{where}: {module} has {sorted(ab)} but needs lora_A and lora_B")
        out[f"{module}.weight"] = (ab["lora_A"], ab["lora_B"])
    return out


def merge_adapter(base_dir: str, adapter_dir: str, out_dir: str) -> str:
    """Write ``base_dir`` with the LoRA adapter of ``adapter_dir`` merged in, to ``out_dir``."""
    with open(os.path.join(adapter_dir, ADAPTER_CONFIG), encoding="utf-8") as f:
        acfg = json.load(f)
    where = os.path.join(adapter_dir, ADAPTER_WEIGHTS)
    r, alpha = int(acfg["r"]), float(acfg["lora_alpha"])
    scale = alpha / (r ** 0.5) if acfg.get("use_rslora") else alpha / r
    pairs = _lora_pairs(load_file(where), where)
    lm = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    params = dict(lm.named_parameters())
    for name in pairs:
        if any(part in name for part in ("lm_head", "embed_tokens")):
            raise ValueError(f"{where}: adapts {name}; an adapter on the (tied) embeddings is not merged")
        if name not in params:
            raise ValueError(f"{where}: adapts {name}, which the base model {base_dir} does not have")
    with torch.no_grad():
        for name, (a, b) in pairs.items():
            w = params[name]
            w += scale * (b.float() @ a.float())
    os.makedirs(out_dir, exist_ok=True)
    lm.save_pretrained(out_dir)
    for f in TOKENIZER_FILES:
        if os.path.exists(os.path.join(base_dir, f)):
            shutil.copy(os.path.join(base_dir, f), os.path.join(out_dir, f))
    return out_dir
