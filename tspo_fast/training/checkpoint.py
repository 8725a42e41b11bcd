"""Checkpoints: DeepSpeed engine state + trainer state, written atomically; HF export.

Layout under ``<output_dir>/checkpoints``::

    step_000010/ds/...            DeepSpeed (model, optimizer, scheduler) state, every rank's shards
    step_000010/trainer.json      step, data position, metrics summary, config
    step_000010/rng_rank{r}.pt    Python, NumPy and torch RNG states of rank r
    latest                        the name of the newest complete checkpoint

A checkpoint is written into ``.tmp-step_000010`` and renamed when complete, then ``latest``
is replaced atomically, so a crash mid-write never leaves a half checkpoint as ``latest``.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from typing import Any, Dict, Optional

import numpy as np
import torch

from .distributed import barrier as _barrier
from .distributed import rank as _rank


def rng_state() -> Dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def _write_text_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(engine, ckpt_root: str, step: int, state: Dict[str, Any], keep: int = 2) -> str:
    """Collective: every rank calls it.  Returns the checkpoint folder."""
    name = f"step_{step:06d}"
    final = os.path.join(ckpt_root, name)
    tmp = os.path.join(ckpt_root, f".tmp-{name}")
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp, exist_ok=True)
    _barrier()
    engine.save_checkpoint(tmp, tag="ds", save_latest=False)
    torch.save(rng_state(), os.path.join(tmp, f"rng_rank{_rank()}.pt"))
    _barrier()
    if _rank() == 0:
        _write_text_atomic(os.path.join(tmp, "trainer.json"), json.dumps(state, indent=1, default=str))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _write_text_atomic(os.path.join(ckpt_root, "latest"), name)
        _prune(ckpt_root, keep)
    _barrier()
    return final


def _prune(ckpt_root: str, keep: int) -> None:
    if keep <= 0:
        return
    steps = sorted(d for d in os.listdir(ckpt_root) if d.startswith("step_"))
    for d in steps[:-keep]:
        shutil.rmtree(os.path.join(ckpt_root, d), ignore_errors=True)


def latest_checkpoint(ckpt_root: str) -> Optional[str]:
    path = os.path.join(ckpt_root, "latest")
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        name = f.read().strip()
    folder = os.path.join(ckpt_root, name)
    if not os.path.exists(os.path.join(folder, "trainer.json")):
        raise FileNotFoundError(f"{path} names {name}, but {folder}/trainer.json is missing: the checkpoint is incomplete")
    return folder


def load_checkpoint(engine, folder: str) -> Dict[str, Any]:
    """Collective: restores the engine, this rank's RNG, and returns the trainer state."""
    load_path, _ = engine.load_checkpoint(folder, tag="ds")
    if load_path is None:
        raise FileNotFoundError(f"DeepSpeed found no checkpoint in {folder}/ds")
    rng = os.path.join(folder, f"rng_rank{_rank()}.pt")
    if os.path.exists(rng):
        set_rng_state(torch.load(rng, weights_only=False))
    with open(os.path.join(folder, "trainer.json"), encoding="utf-8") as f:
        return json.load(f)


def export_hf(engine, lm, tokenizer, out_dir: str) -> Optional[str]:
    """Save the policy in Hugging Face format (collective under ZeRO-3; rank 0 writes)."""
    if hasattr(engine, "_zero3_consolidated_16bit_state_dict") and engine.zero_optimization_stage() == 3:
        state = engine._zero3_consolidated_16bit_state_dict()
    else:
        state = engine.module.state_dict()
    if _rank() != 0:
        return None
    prefix = "lm."
    state = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}
    tmp = out_dir.rstrip("/") + f".tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    lm.save_pretrained(tmp, state_dict=state)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return out_dir
