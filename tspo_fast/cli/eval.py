"""``tspo-fast eval --config CFG --checkpoint PATH``: greedy evaluation of a policy.

PATH is a Hugging Face model folder (e.g. written by ``train --export``) or a training
checkpoint folder (``<output_dir>/checkpoints/step_N`` or the ``checkpoints`` folder itself,
which means its latest), verified against its manifest first.  A checkpoint's weights are read
from its DeepSpeed files (no optimizer, no distributed start) and loaded into the rollout engine of
``model.path``.  Prints a table and writes ``--out`` (JSON; default
``<output_dir>-eval/<checkpoint>.json``, beside the run).  Nothing is ever written into a training
run's folder (one with ``config.yaml`` and ``checkpoints/`` or ``metrics.jsonl``): an ``--out``
inside one is refused.
"""
from __future__ import annotations

import argparse
import glob
import os
from typing import Dict, List, Optional

import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from transformers import AutoConfig

from ..config import ConfigError, load_config
from ..data import drop_long_prompts, load_split
from ..models import load_tokenizer, resolve_model_path
from ..training.builders import build_rollout
from ..training.checkpoint import find_checkpoint, list_checkpoints, read_state
from ..training.distributed import stdout_to_stderr
from ..training.evaluate import evaluate, format_table, write_result

__all__ = ["main", "checkpoint_weights"]


def checkpoint_weights(folder: str, model_path: str, dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    """The policy weights of a training checkpoint folder, with Hugging Face names (a tied LM
    head is the embedding: it is not listed twice)."""
    ds = os.path.join(folder, "ds")
    if glob.glob(os.path.join(ds, "zero_pp_rank_*")):          # ZeRO stages 1-3: the fp32 master weights
        with stdout_to_stderr():                               # (DeepSpeed prints its progress)
            state = get_fp32_state_dict_from_zero_checkpoint(folder, tag="ds")
    else:                                                      # stage 0: the module as it was saved
        state = torch.load(os.path.join(ds, "mp_rank_00_model_states.pt"), map_location="cpu", weights_only=False)["module"]
    prefix = "lm."
    out = {k[len(prefix):] if k.startswith(prefix) else k: v.to(dtype) for k, v in state.items()}
    if getattr(AutoConfig.from_pretrained(model_path), "tie_word_embeddings", False):
        out.pop("lm_head.weight", None)
    return out


def _check_model(folder: str, model_path: str) -> None:
    """The checkpoint's run trained ``model.path`` (recorded in its trainer.json): else a ConfigError."""
    saved = (read_state(folder).get("config") or {}).get("model", {}).get("path")
    if saved is None or saved == model_path:
        return
    try:
        same = os.path.realpath(resolve_model_path(saved)) == os.path.realpath(resolve_model_path(model_path))
    except (OSError, ValueError):
        same = False
    if not same:
        raise ConfigError(f"--checkpoint {folder}: its run trained model.path {saved!r}, the config gives "
                          f"{model_path!r}; evaluate it with --set model.path={saved}")


def run_folder(path: str) -> Optional[str]:
    """The training run folder ``path`` is in (or is), if any: a folder holding ``config.yaml``
    and ``checkpoints/`` or ``metrics.jsonl``."""
    d = os.path.abspath(path)
    while True:
        if os.path.isfile(os.path.join(d, "config.yaml")) and (
                os.path.isdir(os.path.join(d, "checkpoints")) or os.path.isfile(os.path.join(d, "metrics.jsonl"))):
            return d
        parent = os.path.dirname(d)
        if parent == d:
            return None
        d = parent


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="tspo-fast eval", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--checkpoint", default=None, help="HF folder or training checkpoint (default: model.path)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--limit", type=int, default=None,
                    help="evaluate only the first N test questions (0: all; default: data.eval_limit)")
    ap.add_argument("--out", default=None,
                    help="JSON result path (default: <output_dir>-eval/<checkpoint>.json); never inside a training run")
    args = ap.parse_args(argv)

    if args.limit is not None and args.limit < 0:
        raise ConfigError(f"--limit: must be >= 0 (0 = every test question), got {args.limit}")
    cfg = load_config(args.config, args.overrides)
    ck = args.checkpoint
    if ck is not None and not os.path.exists(ck):
        raise FileNotFoundError(f"--checkpoint: {ck} does not exist")
    folder = None
    if ck is None or os.path.exists(os.path.join(ck, "config.json")):   # a model folder
        tag = os.path.basename(os.path.normpath(ck)) if ck else "model"
    else:                                                                # a training checkpoint, verified
        root = os.path.exists(os.path.join(ck, "latest")) or bool(list_checkpoints(ck))
        if not root and not os.path.isfile(os.path.join(ck, "trainer.json")):
            raise FileNotFoundError(f"--checkpoint: {ck} holds no checkpoint: give a model folder (with config.json), "
                                    "a training checkpoint (step_N, with trainer.json) or a run's checkpoints folder "
                                    "(holding step_N folders)")
        folder = find_checkpoint(ck, "latest") if root else find_checkpoint(os.path.dirname(os.path.abspath(ck)), ck)
        tag = os.path.basename(os.path.normpath(folder))
        _check_model(folder, cfg.model.path)
    out = args.out or os.path.join(os.path.normpath(cfg.output_dir) + "-eval", f"{tag}.json")
    inside = run_folder(out)
    if inside is not None:
        raise ConfigError(f"--out: {out} is inside the training run folder {inside}; eval never writes into a "
                          "training run's folder (give an --out outside it)")
    weights = None
    if folder is None:
        path = resolve_model_path(ck) if ck else resolve_model_path(cfg.model.path, cfg.model.gguf_file)
    else:
        path = resolve_model_path(cfg.model.path, cfg.model.gguf_file)
        weights = checkpoint_weights(folder, path, getattr(torch, cfg.model.dtype))
    tok = load_tokenizer(path)
    examples, report = drop_long_prompts(load_split(cfg.data.test_files), tok, cfg.data.chat_template,
                                         cfg.data.max_prompt_tokens, policy=cfg.data.overlong_prompts, what="test")
    if report:
        print(f"data: {report}")
    agent = build_rollout(cfg, path, tok)
    if weights is not None:
        try:
            agent.engine.load_weights(weights.items())
        except (RuntimeError, ValueError, KeyError) as e:     # shapes or names of another model
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ConfigError(f"--checkpoint {folder}: its weights do not fit model.path {cfg.model.path!r} ({first}); "
                              "set model.path to the model the run trained") from e
        agent.engine.reset_prefix_cache()
    limit = args.limit if args.limit is not None else cfg.data.eval_limit
    result = evaluate(agent, tok, examples, chat_template=cfg.data.chat_template,
                      limit=limit or None, folr_source=cfg.reward.folr_source)
    print(format_table(result))
    write_result(result, out)
    print("wrote", out)
    return 0
