"""Checkpoints: DeepSpeed engine state + trainer state, written atomically and verified on load;
the comparison of a resumed run's config with the checkpoint's; HF export.

Layout under ``<output_dir>/checkpoints``::

    step_000010/ds/...            DeepSpeed (model, optimizer, scheduler) state, every rank's shards
    step_000010/trainer.json      step, data position, health of the step, world size, the run's config
    step_000010/rng_rank{r}.pt    Python, NumPy and torch RNG states of rank r
    step_000010/manifest.json     size and SHA-256 of every other file of the folder
    latest                        the name of the newest complete checkpoint

Writing (collective): everything goes into ``.tmp-step_000010``; every file is hashed and fsynced
(each rank takes its share), the manifest is written last, the folder is fsynced and renamed, then
``latest`` is replaced atomically.  A crash or ``kill -9`` mid-write leaves only a ``.tmp-`` folder,
which is never read and is removed by the next save.  Re-saving an existing step renames the old
copy aside, renames the new one in, and only then deletes the old one (:func:`replace_folder`).

Reading: :func:`find_checkpoint` verifies the manifest (sizes and checksums; each rank checks its
share) and names the first bad file; with ``mode="auto"`` it falls back to the newest valid older
checkpoint.  Pruning keeps the newest ``keep`` checkpoints, the one ``latest`` names, the newest
one whose step was healthy (``trainer.json: "healthy"``: it passed the guard's checks of the update,
:mod:`tspo_fast.training.guard`), and those the caller protects (a checkpoint the run loaded
without a manifest, so that what grew from unchecked files is never all that is kept).
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.distributed as dist

from ..cache import hash_file
from ..config import Config, ConfigError, OnResume, resume_rules
from .distributed import barrier as _barrier
from .distributed import rank as _rank
from .distributed import world_size as _world_size

__all__ = ["CheckpointError", "MANIFEST", "write_atomic", "replace_folder", "staged_folder", "save_checkpoint", "list_checkpoints",
           "verify_checkpoint", "read_state", "find_checkpoint", "latest_checkpoint", "load_checkpoint",
           "resume_changes", "apply_optimizer_settings", "consolidated_state", "export_hf", "rng_state",
           "set_rng_state"]

MANIFEST = "manifest.json"
STATE = "trainer.json"
LATEST = "latest"
TMP_PREFIX = ".tmp-"
OLD_PREFIX = ".replaced-"
_STEP_RE = re.compile(r"^step_(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint folder is incomplete, corrupted or cannot be loaded; the message names the file."""


# ----------------------------------------------------------------------------- RNG
def rng_state() -> Dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


# ----------------------------------------------------------------------------- durable writes
def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str, data: Union[str, bytes]) -> None:
    """Write ``data`` to ``path`` so that a reader sees the old file or the whole new one:
    a temporary file in the same folder, flushed and fsynced, renamed over ``path``, the folder fsynced."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def replace_folder(tmp: str, final: str) -> None:
    """Rename the complete folder ``tmp`` to ``final``.  An existing ``final`` is renamed aside
    first and deleted only once the new one is in place, so a crash in between leaves a good copy
    (``.replaced-<name>``, which :func:`list_checkpoints` still finds)."""
    parent = os.path.dirname(os.path.abspath(final))
    old = os.path.join(parent, OLD_PREFIX + os.path.basename(final))
    if os.path.exists(final):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(parent)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staged_folder(final: str) -> Iterator[str]:
    """A fresh temporary folder beside ``final`` (same file system) for the block to write into.
    When the block completes it replaces ``final`` (:func:`replace_folder`: a reader sees the old
    folder or the whole new one); when the block raises it is removed and ``final`` is untouched."""
    final = final.rstrip("/") or final
    tmp = f"{final}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_folder(tmp, final)


def _files(folder: str) -> List[str]:
    """Every file under ``folder`` (relative paths, sorted), the manifest excluded."""
    out = []
    for root, _, names in os.walk(folder):
        for n in names:
            rel = os.path.relpath(os.path.join(root, n), folder)
            if rel != MANIFEST:
                out.append(rel)
    return sorted(out)


def _gather(obj: Any) -> List[Any]:
    """``obj`` of every rank (a list in rank order; ``[obj]`` without a process group)."""
    if not dist.is_initialized() or _world_size() == 1:
        return [obj]
    out: List[Any] = [None] * _world_size()
    dist.all_gather_object(out, obj)
    return out


def _share(items: Sequence[str]) -> List[str]:
    r, w = _rank(), _world_size()
    return [x for i, x in enumerate(items) if i % w == r]


def _hash_files(folder: str, rels: Sequence[str], fsync: bool) -> Dict[str, Dict[str, Any]]:
    """{rel: {"size", "sha256"}} of ``rels`` (hashed on threads: hashlib releases the GIL)."""
    def one(rel):
        size, digest = hash_file(os.path.join(folder, rel), fsync=fsync)
        return rel, {"size": size, "sha256": digest}
    if not rels:
        return {}
    with ThreadPoolExecutor(max_workers=min(8, len(rels))) as pool:
        return dict(pool.map(one, rels))


# ----------------------------------------------------------------------------- save
def save_checkpoint(engine, ckpt_root: str, step: int, state: Dict[str, Any], keep: int = 2,
                    exclude_frozen: bool = False, protect: Sequence[str] = ()) -> str:
    """Collective: every rank calls it.  Returns the checkpoint folder.  ``state`` goes to
    ``trainer.json`` (its ``"healthy"`` flag protects the folder from pruning while it is the newest
    healthy one).  ``exclude_frozen``: keep only trainable parameters (LoRA: the adapters; the base
    comes from ``model.path``).  ``protect``: checkpoint folders pruning must keep as well."""
    name = f"step_{step:06d}"
    final = os.path.join(ckpt_root, name)
    tmp = os.path.join(ckpt_root, TMP_PREFIX + name)
    if _rank() == 0:
        os.makedirs(ckpt_root, exist_ok=True)
        for d in os.listdir(ckpt_root):          # left by a crash mid-write: never read, removed here
            if d.startswith(TMP_PREFIX):
                shutil.rmtree(os.path.join(ckpt_root, d), ignore_errors=True)
            elif d.startswith(LATEST + ".tmp"):
                os.remove(os.path.join(ckpt_root, d))
        os.makedirs(tmp)
    _barrier()
    engine.save_checkpoint(tmp, tag="ds", save_latest=False, exclude_frozen_parameters=exclude_frozen)
    torch.save(rng_state(), os.path.join(tmp, f"rng_rank{_rank()}.pt"))
    _barrier()
    if _rank() == 0:
        write_atomic(os.path.join(tmp, STATE), json.dumps(state, indent=1, default=str))
    _barrier()
    rels = _files(tmp)
    entries: Dict[str, Dict[str, Any]] = {}
    for part in _gather(_hash_files(tmp, _share(rels), fsync=True)):
        entries.update(part)
    if _rank() == 0:
        write_atomic(os.path.join(tmp, MANIFEST),
                     json.dumps({"format": 1, "algorithm": "sha256", "files": dict(sorted(entries.items()))}, indent=1))
        for root, dirs, _ in os.walk(tmp):
            for d in dirs:
                _fsync_dir(os.path.join(root, d))
        replace_folder(tmp, final)
        write_atomic(os.path.join(ckpt_root, LATEST), name)
        _prune(ckpt_root, keep, protect)
    _barrier()
    return final


def _healthy(folder: str) -> bool:
    try:
        with open(os.path.join(folder, STATE), encoding="utf-8") as f:
            return bool(json.load(f).get("healthy", True))
    except (OSError, ValueError):
        return False


def _latest_name(ckpt_root: str) -> Optional[str]:
    try:
        with open(os.path.join(ckpt_root, LATEST), encoding="utf-8") as f:
            return f.read().strip() or None
    except OSError:
        return None


def _prune(ckpt_root: str, keep: int, protect: Sequence[str] = ()) -> None:
    """Delete all but the newest ``keep`` checkpoints (0: keep all), never the one ``latest``
    names, the newest one whose step was healthy, nor those of ``protect``."""
    if keep <= 0:
        return
    found = list_checkpoints(ckpt_root)
    kept = {os.path.abspath(p) for p in protect} | {os.path.abspath(os.path.join(ckpt_root, _latest_name(ckpt_root) or ""))}
    healthy = [folder for _, folder in found if _healthy(folder)]
    if healthy:
        kept.add(os.path.abspath(healthy[-1]))
    for _, folder in found[:-keep]:
        if os.path.abspath(folder) not in kept:
            shutil.rmtree(folder, ignore_errors=True)


# ----------------------------------------------------------------------------- find and verify
def list_checkpoints(ckpt_root: str) -> List[Tuple[int, str]]:
    """(step, folder) of every checkpoint folder with a ``trainer.json``, oldest first (``.tmp-``
    folders are incomplete and never listed; a ``.replaced-`` copy only when its step is missing)."""
    if not os.path.isdir(ckpt_root):
        return []
    found: Dict[int, str] = {}
    names = sorted(os.listdir(ckpt_root))
    for n in names:
        bare = n[len(OLD_PREFIX):] if n.startswith(OLD_PREFIX) else n
        m = _STEP_RE.match(bare)
        folder = os.path.join(ckpt_root, n)
        if not m or not os.path.isfile(os.path.join(folder, STATE)):
            continue
        step = int(m.group(1))
        if n.startswith(OLD_PREFIX) and bare in names:
            continue
        found[step] = folder
    return sorted(found.items())


def _problems(folder: str, share: bool) -> List[str]:
    """What is wrong with ``folder`` (empty: it matches its manifest).  ``share``: check only this
    rank's share of the files (the caller gathers every rank's answer)."""
    man_path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(os.path.join(folder, STATE)):
        return [f"{os.path.join(folder, STATE)} is missing: the checkpoint is incomplete"]
    if not os.path.isfile(man_path):
        return []            # written before manifests existed: reported (and loaded) unverified by the caller
    try:
        with open(man_path, encoding="utf-8") as f:
            files = json.load(f)["files"]
        assert isinstance(files, dict)
    except (OSError, ValueError, KeyError, AssertionError) as e:
        return [f"{man_path} is unreadable ({type(e).__name__}: {e})"]
    rels = sorted(files)
    out = []
    for rel in (_share(rels) if share else rels):
        path = os.path.join(folder, rel)
        want = files[rel]
        if not os.path.isfile(path):
            out.append(f"{path} is missing")
            continue
        size = os.path.getsize(path)
        if size != want.get("size"):
            out.append(f"{path} has {size} bytes, the manifest says {want.get('size')} (truncated or overwritten)")
            continue
        if hash_file(path)[1] != want.get("sha256"):
            out.append(f"{path} does not match its checksum in {MANIFEST} (corrupted)")
    return out


def _check_all(folder: str) -> List[str]:
    """Problems of ``folder`` found by all ranks together (the same list on every rank)."""
    return [p for part in _gather(_problems(folder, share=True)) for p in part]


def verify_checkpoint(folder: str) -> None:
    """Raise :class:`CheckpointError` naming the first file of ``folder`` that does not match its
    manifest (missing, wrong size, wrong checksum).  Not collective."""
    problems = _problems(folder, share=False)
    if problems:
        raise CheckpointError(problems[0] + (f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""))


def read_state(folder: str) -> Dict[str, Any]:
    """``trainer.json`` of a checkpoint folder."""
    path = os.path.join(folder, STATE)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read the trainer state ({type(e).__name__}: {e})") from None


def _say(msg: str) -> None:
    if _rank() == 0:
        print(msg, file=sys.stderr, flush=True)


def find_checkpoint(ckpt_root: str, mode: str = "latest") -> Optional[str]:
    """The checkpoint to resume from (collective when a process group is up: ranks share the checks).

    ``mode``: ``"latest"`` the one ``latest`` names (else the newest), which must be valid: a bad
    file raises :class:`CheckpointError` naming it and the newest valid older checkpoint, to take
    with ``--resume auto``; ``"auto"`` the newest valid one, skipping (and reporting) bad ones, None
    when there is no checkpoint at all; any other value is a checkpoint folder (or its name under
    ``ckpt_root``), which must be valid."""
    if mode not in ("latest", "auto"):
        folder = mode if os.path.isdir(mode) else os.path.join(ckpt_root, mode)
        if not os.path.isdir(folder):
            raise CheckpointError(f"--resume {mode}: no checkpoint folder {mode} (nor {folder})")
        problems = _check_all(folder)
        if problems:
            raise CheckpointError(f"checkpoint {folder} is not valid: {problems[0]}")
        _note_unverified(folder)
        return folder
    found = list_checkpoints(ckpt_root)
    if not found:
        if mode == "auto":
            return None
        raise CheckpointError(f"--resume: no checkpoint under {ckpt_root}")
    named = _latest_name(ckpt_root)
    order = [folder for _, folder in reversed(found)]
    if named is not None:
        folder = _resolve_name(ckpt_root, named)
        if folder is None:
            if mode == "latest":
                raise CheckpointError(f"{os.path.join(ckpt_root, LATEST)} names {named}, which is missing or incomplete"
                                      + _offer(order, ckpt_root))
            _say(f"resume: {os.path.join(ckpt_root, LATEST)} names {named}, which is missing or incomplete; "
                 "looking at older checkpoints")
        else:   # start at the one `latest` names; newer folders (a re-save in progress) are not trusted
            order = order[order.index(folder):] if folder in order else [folder] + order
    for i, folder in enumerate(order):
        problems = _check_all(folder)
        if not problems:
            _note_unverified(folder)
            return folder
        if mode == "latest":
            raise CheckpointError(f"checkpoint {folder} is not valid: {problems[0]}" + _offer(order[i + 1:], ckpt_root))
        _say(f"resume: skipping {folder}: {problems[0]}")
    raise CheckpointError(f"no valid checkpoint under {ckpt_root} (checked {len(order)})")


def _resolve_name(ckpt_root: str, name: str) -> Optional[str]:
    for n in (name, OLD_PREFIX + name):
        folder = os.path.join(ckpt_root, n)
        if os.path.isfile(os.path.join(folder, STATE)):
            return folder
    return None


def _offer(older: Sequence[str], ckpt_root: str) -> str:
    """The newest valid checkpoint of ``older``, as an offer to the user."""
    for folder in older:
        if not _check_all(folder):
            return (f"; the newest valid older checkpoint is {os.path.basename(folder)}: resume from it with "
                    f"--resume auto (or --resume {folder})")
    return f"; no older checkpoint under {ckpt_root} is valid"


def _note_unverified(folder: str) -> None:
    if not os.path.isfile(os.path.join(folder, MANIFEST)):
        _say(f"resume: {folder} has no {MANIFEST} (written before checkpoints carried one): loading it unverified")


def latest_checkpoint(ckpt_root: str) -> Optional[str]:
    """The checkpoint ``latest`` names, verified (None when there is none)."""
    if not list_checkpoints(ckpt_root):
        return None
    return find_checkpoint(ckpt_root, "latest")


def load_checkpoint(engine, folder: str, exclude_frozen: bool = False) -> Dict[str, Any]:
    """Collective: restores the engine, this rank's RNG, and returns the trainer state
    (``exclude_frozen``: the checkpoint holds the trainable parameters only).  Failures name the folder."""
    state = read_state(folder)
    try:
        load_path, _ = engine.load_checkpoint(folder, tag="ds", load_module_strict=not exclude_frozen)
    except Exception as e:  # DeepSpeed's errors name no file: add the folder
        raise CheckpointError(f"{folder}/ds: DeepSpeed could not load the checkpoint ({type(e).__name__}: {e})") from e
    if load_path is None:
        raise CheckpointError(f"DeepSpeed found no checkpoint in {folder}/ds")
    rng = os.path.join(folder, f"rng_rank{_rank()}.pt")
    if os.path.exists(rng):
        try:
            set_rng_state(torch.load(rng, weights_only=False))
        except Exception as e:
            raise CheckpointError(f"{rng}: cannot restore the RNG state ({type(e).__name__}: {e})") from e
    return state


# ----------------------------------------------------------------------------- config on resume
def _flat(tree: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def _rule(rules: Dict[str, OnResume], key: str) -> Optional[OnResume]:
    """The rule of ``key`` or of the nearest section above it that has one (None: none)."""
    parts = key.split(".")
    for i in range(len(parts), 0, -1):
        rule = rules.get(".".join(parts[:i]))
        if rule is not None:
            return rule
    return None


def resume_changes(state: Dict[str, Any], cfg: Config, world: int) -> List[str]:
    """Compare the run's config with the one a checkpoint's ``state`` recorded, field by field,
    under each field's :class:`~tspo_fast.config.OnResume` rule.  Changes the checkpoint cannot be
    loaded under raise :class:`ConfigError` (all of them, one line each); the others are
    returned, one line each saying how they are applied."""
    saved_world = state.get("world_size")
    refused = []
    if saved_world is not None and int(saved_world) != world:
        refused.append(f"world size: the checkpoint was written by {saved_world} rank(s), this run has {world} "
                       "(ZeRO partitions are per rank; convert it with DeepSpeed's zero_to_fp32 and start a new run)")
    saved = state.get("config")
    if not isinstance(saved, dict):
        if refused:
            raise ConfigError("--resume: " + "; ".join(refused))
        return ["the checkpoint records no config (written by an older version): the config was not compared"]
    old, new = _flat(saved), _flat(cfg.to_dict())
    rules = resume_rules()         # declared beside each field in tspo_fast/config.py
    applied = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<unset>"), new.get(key, "<unset>")
        if a == b or (a in (None, "<unset>") and b in (None, "<unset>")):
            continue            # (a field added since the checkpoint was written, at its null default: no change)
        rule = _rule(rules, key)
        applies = rule.applies if rule is not None else "next step"
        if applies == "ignored":
            continue
        if applies == "never":
            refused.append(f"{key}: {a!r} -> {b!r} cannot apply to this checkpoint ({rule.why})")
        elif rule is not None and rule.on_off and (a == 0) != (b == 0):
            refused.append(f"{key}: {a!r} -> {b!r} cannot apply: the checkpoint {'has no' if a == 0 else 'has a'} "
                           f"{rule.on_off}")
        elif applies == "optimizer":
            applied.append(f"{key}: {a!r} -> {b!r} (applied to the restored optimizer and schedule)")
        elif applies == "data order":
            applied.append(f"{key}: {a!r} -> {b!r} (applied: the questions of the next steps differ from the "
                           "original run's)")
        else:
            applied.append(f"{key}: {a!r} -> {b!r} (applied from the next step)")
    if refused:
        raise ConfigError("--resume: the config differs from the checkpoint's in ways that cannot apply: "
                          + "; ".join(refused) + " (restore those fields, or start a new output_dir)")
    return applied


def apply_optimizer_settings(engine, cfg: Config) -> None:
    """After a resume: the optimizer's lr and weight decay from ``cfg`` (DeepSpeed restores the
    checkpoint's).  With a warm-up schedule its base lr becomes ``train.lr`` and the current lr
    is recomputed from the restored schedule position."""
    sched = getattr(engine, "lr_scheduler", None)
    groups = engine.optimizer.param_groups
    lrs = [cfg.train.lr] * len(groups)
    if sched is not None and hasattr(sched, "lr_lambdas"):
        sched.base_lrs = list(lrs)
        lrs = [base * fn(sched.last_epoch) for base, fn in zip(sched.base_lrs, sched.lr_lambdas)]
        sched._last_lr = list(lrs)
    for g, lr in zip(groups, lrs):
        g["lr"] = lr
        g["weight_decay"] = cfg.train.weight_decay


# ----------------------------------------------------------------------------- export
def consolidated_state(engine) -> Dict[str, Any]:
    """The module's full state dict (collective under ZeRO-3: every rank calls it; rank 0 gets it)."""
    if hasattr(engine, "_zero3_consolidated_16bit_state_dict") and engine.zero_optimization_stage() == 3:
        return engine._zero3_consolidated_16bit_state_dict()
    return engine.module.state_dict()


def export_hf(engine, lm, tokenizer, out_dir: str) -> Optional[str]:
    """Save the policy in Hugging Face format (collective under ZeRO-3; rank 0 writes)."""
    state = consolidated_state(engine)
    if _rank() != 0:
        return None
    prefix = "lm."
    state = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}
    with staged_folder(out_dir) as tmp:
        lm.save_pretrained(tmp, state_dict=state)
        tokenizer.save_pretrained(tmp)
    return out_dir
