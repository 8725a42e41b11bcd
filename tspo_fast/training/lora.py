"""LoRA adapters on the policy (PEFT): the adapted model, its merged weights for the rollout
engine, and the reference policy as the frozen base.

``model.lora.rank > 0`` wraps the causal LM with ``peft.get_peft_model``: only the adapters train
(the base stays frozen, ZeRO-3 partitions both), the reference log-probs come from the same
module with the adapters disabled (no second copy of the model), checkpoints hold the trainable
parameters only, and the weight sync sends *merged* weights ``W + scaling * B @ A`` under the base
model's Hugging Face names, gathered module by module inside the sync's buckets.

PEFT is an optional dependency (the ``lora`` extra); it is imported where a LoRA run needs it.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, List, Optional, Tuple

import torch

from ..models import load_causal_lm
from .checkpoint import staged_folder

__all__ = ["apply_lora", "is_lora", "disabled_adapters", "merged_weight_entries", "export_lora"]

PREFIX = "base_model.model."


def _peft():
    try:
        import peft
    except ImportError as e:
        raise ImportError("model.lora needs PEFT: pip install 'tspo-fast[lora]' (peft)") from e
    return peft


def apply_lora(lm: torch.nn.Module, settings) -> torch.nn.Module:
    """``lm`` with LoRA adapters (``settings``: a ``LoraSettings``): a ``peft.PeftModel``.  With
    ``settings.top_layers`` the adapters go on the top that-many decoder layers only."""
    peft = _peft()
    layers = None
    top = getattr(settings, "top_layers", 0)
    if top:
        n = int(lm.config.num_hidden_layers)
        if top > n:
            raise ValueError(f"model.lora.top_layers: {top} is more than the model's {n} decoder layers")
        layers = list(range(n - top, n))
    cfg = peft.LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                          target_modules=list(settings.target_modules), bias="none", task_type="CAUSAL_LM",
                          layers_to_transform=layers)
    return peft.get_peft_model(lm, cfg)


def is_lora(module: torch.nn.Module) -> bool:
    return hasattr(module, "peft_config") and hasattr(module, "disable_adapter")


@contextlib.contextmanager
def disabled_adapters(module: torch.nn.Module):
    """The frozen base model for the duration (a no-op for a model without adapters)."""
    if is_lora(module):
        with module.disable_adapter():
            yield
    else:
        yield


def _hf_name(peft_name: str) -> str:
    name = peft_name[len(PREFIX):] if peft_name.startswith(PREFIX) else peft_name
    return name.replace(".base_layer.", ".")


Entry = Tuple[str, List[torch.Tensor], Callable[[List[torch.Tensor]], torch.Tensor]]


def merged_weight_entries(model: torch.nn.Module) -> Iterator[Entry]:
    """(Hugging Face name, parameters to gather, function of them -> the tensor to send) for every
    weight of the base model, LoRA layers merged: ``W + scaling * B @ A`` (adapter "default")."""
    lora_layer = _peft().tuners.lora.LoraLayer
    merged_modules = {}
    for mname, mod in model.named_modules():
        if isinstance(mod, lora_layer) and "default" in mod.lora_A:
            merged_modules[mname] = mod
    taken = set()
    for mname, mod in merged_modules.items():
        w, a, b = mod.base_layer.weight, mod.lora_A["default"].weight, mod.lora_B["default"].weight
        scale = float(mod.scaling["default"])
        taken |= {id(w), id(a), id(b)}
        yield (_hf_name(f"{mname}.base_layer.weight"), [w, a, b],
               lambda t, s=scale: (t[0].float() + s * (t[2].float() @ t[1].float())).to(t[0].dtype))
    for name, p in model.named_parameters():
        if id(p) in taken or ".lora_" in name:
            continue
        yield _hf_name(name), [p], lambda t: t[0]


def export_lora(state: dict, base_path: str, settings, out_dir: str, *, merged: bool, tokenizer,
                dtype: Optional[torch.dtype] = None) -> str:
    """Write a LoRA policy from its full (consolidated, PEFT-named) ``state``: the merged model
    in Hugging Face format, or (``merged=False``) the adapter alone (PEFT's ``save_pretrained``).
    ``out_dir`` is replaced whole, once everything is written (:func:`~.checkpoint.staged_folder`)."""
    lm = load_causal_lm(base_path)
    model = apply_lora(lm, settings)
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    bad = [k for k in missing if ".lora_" in k] + list(unexpected)
    if bad:
        raise ValueError(f"LoRA export: the checkpoint does not match the adapters: {bad[:5]}")
    with staged_folder(out_dir) as tmp:
        if merged:
            out = model.merge_and_unload()
            if dtype is not None:
                out = out.to(dtype)
            out.save_pretrained(tmp)
        else:
            model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out_dir
