"""The bundled embedded world: a small invented encyclopedia and QA sets about it.

The files under ``data/`` are produced by ``python -m tspo_fast.worldgen.generate`` (deterministic:
a fresh run gives byte-identical files, which a test checks):

* ``corpus.jsonl``: passages ``{id, contents}`` in the wiki-18 layout (``"Title"\\ntext``);
* ``train.jsonl`` / ``test.jsonl``: questions in the Search-R1 layout, ``data_source``
  ``world_1hop`` (one search needed) or ``world_2hop`` (two searches needed);
  ``extra_info.support`` lists the ids of the passages that hold the evidence, hop by hop.

``warm_policy/`` holds the warm-start policy built from this world by
``python -m tspo_fast.worldgen.warmstart --out tspo_fast/world/warm_policy`` (config ``bundled:warmstart``).
``smollm2_warm/`` holds the LoRA adapter that turns SmolLM2-135M-Instruct into the protocol warm start
``bundled:smollm2-warmstart``, built by ``python -m tspo_fast.worldgen.smollm2_warmstart --out
tspo_fast/world/smollm2_warm``.
"""
from __future__ import annotations

from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"
WARM_POLICY_DIR = str(Path(__file__).resolve().parent / "warm_policy")
SMOLLM2_WARM_DIR = str(Path(__file__).resolve().parent / "smollm2_warm")

__all__ = ["DATA_DIR", "WARM_POLICY_DIR", "SMOLLM2_WARM_DIR", "corpus_path", "qa_path"]


def corpus_path() -> Path:
    """The bundled corpus (JSONL, ``{id, contents}``)."""
    return DATA_DIR / "corpus.jsonl"


def qa_path(split: str) -> Path:
    """The bundled questions of ``split`` (``train`` or ``test``; Search-R1 layout, JSONL)."""
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r} (expected 'train' or 'test')")
    return DATA_DIR / f"{split}.jsonl"
