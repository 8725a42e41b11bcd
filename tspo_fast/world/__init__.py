"""The bundled embedded worlds: small invented encyclopedias and QA sets about them.

* ``world`` (the default; files in ``data/``, built by ``python -m tspo_fast.worldgen.generate``):
  people, companies, cities, rivers and countries; one- and two-hop questions
  (``data_source`` ``world_1hop`` / ``world_2hop``).  Config names: ``bundled:train``,
  ``bundled:test``, ``bundled:bm25`` / ``bundled:dense`` and the warm start ``bundled:warmstart``
  (``warm_policy/``, built by ``python -m tspo_fast.worldgen.warmstart``).
* ``hops`` (files in ``hops/``, built by ``python -m tspo_fast.worldgen.hops``): landmarks,
  companies, people, cities and countries linked in chains; two- and three-hop questions whose
  first search cannot return the answer (``hops_2`` / ``hops_3``).  Config names:
  ``bundled:hops-train``, ``bundled:hops-test``, ``bundled:hops-bm25`` and the warm start
  ``bundled:hops-warmstart`` (``hops_policy/``, built by ``python -m tspo_fast.worldgen.hops_warmstart``).

Each world's files: ``corpus.jsonl`` (passages ``{id, contents}``, wiki-18 layout
``"Title"\\ntext``), ``train.jsonl`` / ``test.jsonl`` (Search-R1 layout; ``extra_info.support``
lists the ids of the passages that hold the evidence, hop by hop).  The generators are
deterministic: a fresh run gives byte-identical files, which a test checks.

``smollm2_warm/`` holds the LoRA adapter that turns SmolLM2-135M-Instruct into a protocol warm start
for the default world, ``bundled:smollm2-warmstart``, built by ``python -m
tspo_fast.worldgen.smollm2_warmstart --out tspo_fast/world/smollm2_warm``.
"""
from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).resolve().parent
#: world name -> (data folder, warm-start policy folder)
WORLDS = {"world": (_HERE / "data", _HERE / "warm_policy"), "hops": (_HERE / "hops", _HERE / "hops_policy")}
DATA_DIR = WORLDS["world"][0]
WARM_POLICY_DIR = str(WORLDS["world"][1])
SMOLLM2_WARM_DIR = str(_HERE / "smollm2_warm")

__all__ = ["DATA_DIR", "SMOLLM2_WARM_DIR", "WARM_POLICY_DIR", "WORLDS", "corpus_path", "qa_path", "split_bundled", "warm_policy_dir",
           "world_dir"]


def split_bundled(name: str) -> tuple:
    """``"bundled:train"`` -> ``("world", "train")``; ``"bundled:hops-train"`` -> ``("hops", "train")``.

    The part after ``bundled:`` is ``[<world>-]<what>``; no world prefix means the default world.
    The world is not checked here (callers name the config field in their errors)."""
    rest = name.split(":", 1)[1] if name.startswith("bundled:") else name
    world, sep, what = rest.partition("-")
    return (world, what) if sep and world in WORLDS else ("world", rest)


def world_dir(world: str = "world") -> Path:
    """The data folder of ``world`` (``world`` or ``hops``)."""
    if world not in WORLDS:
        raise ValueError(f"unknown bundled world {world!r} (expected one of {', '.join(WORLDS)})")
    return WORLDS[world][0]


def warm_policy_dir(world: str = "world") -> str:
    """The warm-start policy folder of ``world``."""
    world_dir(world)
    return str(WORLDS[world][1])


def corpus_path(world: str = "world") -> Path:
    """A bundled corpus (JSONL, ``{id, contents}``)."""
    return world_dir(world) / "corpus.jsonl"


def qa_path(split: str, world: str = "world") -> Path:
    """The bundled questions of ``split`` (``train`` or ``test``; Search-R1 layout, JSONL)."""
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r} (expected 'train' or 'test')")
    return world_dir(world) / f"{split}.jsonl"
