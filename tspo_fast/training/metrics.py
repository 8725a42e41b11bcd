"""Step metrics and their log, to the backends of ``logging.backends``: one JSON object per line
(``metrics.jsonl``), TensorBoard scalars, and Weights & Biases (``wandb``, an optional extra).

:func:`step_metrics` also reports Search-R1's rollout metrics under Search-R1's own names
(``env/number_of_actions/mean``, ``env/finish_ratio``, ``env/number_of_valid_action``,
``env/ratio_of_valid_action``, ``env/number_of_valid_search``, ``critic/score/mean``,
``response_length/mean``, ...), computed as Search-R1's ``ray_trainer.compute_data_metrics``
computes them from its generation loop's counters.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from typing import Any, Dict, Iterator, List, Optional, Sequence

import matplotlib.image
import torch
from torch.utils.tensorboard import SummaryWriter

from ..config import LOG_BACKENDS
from ..protocol import parse_action

__all__ = ["MetricsLogger", "read_metrics", "step_metrics", "phase", "all_fail_fraction", "search_r1_metrics"]


@contextlib.contextmanager
def phase(times: Dict[str, float], key: str) -> Iterator[None]:
    """Time the block: its wall-clock seconds are added to ``times[key]``, a ``time/*`` metric of
    docs/metrics.md (``with phase(times, "time/update"): ...``).  A block that raises records nothing."""
    start = time.perf_counter()
    yield
    times[key] = times.get(key, 0.0) + time.perf_counter() - start


def all_fail_fraction(outcome: torch.Tensor, group_id: torch.Tensor) -> float:
    """Share of groups whose every rollout scored 0: where GRPO has no signal and FOLR may."""
    groups = torch.unique(group_id)
    if groups.numel() == 0:
        return 0.0
    fails = sum(bool((outcome[group_id == g] <= 0).all()) for g in groups)
    return fails / groups.numel()


def step_metrics(batch, outcome: torch.Tensor, first_turn: torch.Tensor, token_adv: torch.Tensor,
                 turn_adv: torch.Tensor, upd, times: Dict[str, float], *, outcome_kind: str = "em",
                 plan=None) -> Dict[str, float]:
    """The per-step metrics of docs/metrics.md, from a step's batch, rewards, advantages and update."""
    gen_tokens = float(batch.loss_mask.sum())
    adv_on_tokens = token_adv[batch.loss_mask]
    valid_turns = turn_adv[torch.arange(turn_adv.shape[1])[None] < batch.num_turns[:, None].long()]
    m = {
        "reward/mean": float(outcome.mean()),
        "reward/folr_hit": float((first_turn >= 0).float().mean()),
        "reward/all_fail_groups": all_fail_fraction(outcome, batch.group_id),
        "rollout/turns": float(batch.num_turns.float().mean()),
        "rollout/searches": float(batch.num_searches.float().mean()),
        "rollout/truncated": float(batch.truncated.float().mean()),
        "rollout/response_tokens": float(batch.response_lengths().float().mean()),
        "advantage/std": float(valid_turns.std()) if valid_turns.numel() > 1 else 0.0,
        "advantage/token_abs_mean": float(adv_on_tokens.abs().mean()) if adv_on_tokens.numel() else 0.0,
        "loss/pg": upd.loss, "loss/kl": upd.kl, "loss/entropy": upd.entropy, "loss/clip_frac": upd.clip_frac,
        "train/grad_norm": upd.grad_norm, "train/tokens_per_s": gen_tokens / max(times["time/step"], 1e-9),
        **times,
    }
    for k, v in getattr(upd, "mismatch", {}).items():       # rollout engine vs trainer log-probs
        m[f"mismatch/{k}"] = v
    if plan is not None:                                     # what the update ran through the model
        m["train/micro_batches"] = float(len(plan.micro()))
        m["train/tokens"] = float(plan.tokens)            # tokens through the model per pass (prompt included)
        m["train/padding_frac"] = 1.0 - plan.tokens / max(plan.slots, 1)
    if outcome_kind == "em":
        m["reward/em"] = m["reward/mean"]
    m.update(search_r1_metrics(batch, outcome, token_adv))
    return m


def _stats(name: str, x: torch.Tensor, kinds: Sequence[str] = ("mean", "max", "min")) -> Dict[str, float]:
    x = x.float()
    if x.numel() == 0:
        return {f"{name}/{k}": 0.0 for k in kinds}
    return {f"{name}/{k}": float(getattr(x, k)()) for k in kinds}


def search_r1_metrics(batch, outcome: torch.Tensor, token_adv: torch.Tensor) -> Dict[str, float]:
    """Search-R1's metrics, by its names, from a step's ``RolloutBatch`` (Search-R1's
    ``compute_data_metrics`` on its generation loop's counters, per trajectory):

    * ``env/number_of_actions/{mean,max,min}``: actions (turns) per trajectory (its ``turns_stats``);
    * ``env/finish_ratio``: share of trajectories that answered (no longer active at the end);
    * ``env/number_of_valid_action``: mean count of actions that parse as ``<search>`` or
      ``<answer>``; ``env/ratio_of_valid_action``: its mean ratio to the actions;
    * ``env/number_of_valid_search``: mean count of actions that parse as ``<search>``, including
      one in the last turn, which Search-R1 counts but does not run (``rollout/searches``
      counts the searches that ran);
    * ``critic/score/{mean,max,min}``: the outcome reward R; ``critic/advantages/{mean,max,min}``
      over the trained tokens; ``response_length`` / ``prompt_length/{mean,max,min}`` in tokens
      (response: actions and observations).

    The counts are read off each turn's action text with the one action parser
    (``tspo_fast.protocol.parse_action``), so they need no counter in the batch.
    """
    kinds = [[parse_action(t)[0] for t in row] for row in batch.action_texts]
    actions = batch.num_turns.float()
    valid = torch.tensor([sum(k is not None for k in row) for row in kinds], dtype=torch.float32)
    search = torch.tensor([sum(k == "search" for k in row) for row in kinds], dtype=torch.float32)
    finished = torch.tensor([a is not None for a in batch.answer_text], dtype=torch.float32)
    n = max(len(kinds), 1)
    m = {
        **_stats("env/number_of_actions", actions),
        "env/finish_ratio": float(finished.sum()) / n,
        "env/number_of_valid_action": float(valid.sum()) / n,
        "env/ratio_of_valid_action": float((valid / actions.clamp(min=1)).sum()) / n,
        "env/number_of_valid_search": float(search.sum()) / n,
        **_stats("critic/score", outcome),
        **_stats("critic/advantages", token_adv[batch.loss_mask]),
        **_stats("response_length", batch.response_lengths()),
        **_stats("prompt_length", batch.prompt_len),
    }
    return m


class MetricsLogger:
    """Step metrics to the chosen backends (``LOG_BACKENDS``): ``<dir>/metrics.jsonl``,
    TensorBoard under ``<dir>/tensorboard``, and a wandb run (``project``, ``run_name``,
    ``tags``; ``config`` is uploaded as the run's config; files under ``<dir>/wandb``).

    Only rank 0 writes (``enabled``).  On resume the JSONL is truncated to the steps up to the
    checkpoint, so the log of a resumed run reads as if it had never stopped; the wandb run is
    continued (its id is kept in ``<dir>/wandb_run_id``), and wandb ignores steps it has seen.
    ``log_image`` logs a PNG (the reward/EM curves) to TensorBoard and wandb.  ``rows`` holds the
    run's rows, as ``metrics.jsonl`` does (those kept on resume, then every row logged), whatever the
    backends: the end-of-run report reads them (:mod:`tspo_fast.training.report`).
    """

    def __init__(self, out_dir: str, *, enabled: bool = True, backends: Sequence[str] = ("jsonl", "tensorboard"),
                 resume_step: Optional[int] = None, project: str = "tspo-fast", run_name: Optional[str] = None,
                 tags: Sequence[str] = (), config: Optional[Dict[str, Any]] = None):
        unknown = [b for b in backends if b not in LOG_BACKENDS]
        if unknown:
            raise ValueError(f"logging.backends: unknown backend(s) {unknown} (known: {', '.join(LOG_BACKENDS)})")
        self.out_dir = out_dir
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self.enabled = enabled
        self.backends = tuple(backends)
        self._tb = None
        self._wandb = None
        self.rows: List[Dict[str, Any]] = []
        if not enabled:
            return
        os.makedirs(out_dir, exist_ok=True)
        if "jsonl" in self.backends and resume_step is not None and os.path.exists(self.path):
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
            with open(self.path, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r) + "\n" for r in kept)
            self.rows = kept
        if "tensorboard" in self.backends:
            self._tb = SummaryWriter(os.path.join(out_dir, "tensorboard"))
        if "wandb" in self.backends:
            self._wandb = _start_wandb(out_dir, project, run_name or os.path.basename(os.path.normpath(out_dir)),
                                       list(tags), config, resume=resume_step is not None)

    @classmethod
    def from_config(cls, cfg, *, enabled: bool = True, resume_step: Optional[int] = None) -> "MetricsLogger":
        """The logger a run's :class:`~tspo_fast.config.Config` asks for (``cfg.logging``), the
        whole config uploaded to wandb."""
        lg = cfg.logging
        return cls(cfg.output_dir, enabled=enabled, backends=lg.backends, resume_step=resume_step,
                   project=lg.project, run_name=lg.run_name, tags=lg.tags, config=cfg.to_dict())

    @property
    def wandb_run(self):
        """The wandb run (None without the wandb backend)."""
        return self._wandb

    def log(self, step: int, values: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: (float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v)
                                for k, v in values.items()}}
        self.rows.append(row)
        if "jsonl" in self.backends:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
        scalars = {k: v for k, v in row.items() if k != "step" and isinstance(v, float)}
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def log_image(self, key: str, png_path: str, step: int) -> None:
        """Log the PNG at ``png_path`` as image ``key`` (TensorBoard and wandb; jsonl keeps the file)."""
        if not self.enabled or (self._tb is None and self._wandb is None):
            return
        if not os.path.exists(png_path):
            raise FileNotFoundError(f"log_image: no image at {png_path}")
        if self._tb is not None:
            self._tb.add_image(key, matplotlib.image.imread(png_path)[..., :3], step, dataformats="HWC")
            self._tb.flush()
        if self._wandb is not None:
            import wandb
            self._wandb.log({key: wandb.Image(png_path)}, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _start_wandb(out_dir: str, project: str, name: str, tags: List[str], config: Optional[Dict[str, Any]],
                 *, resume: bool):
    """A wandb run writing under ``<out_dir>/wandb``; on resume, the run of ``<out_dir>/wandb_run_id``."""
    try:
        import wandb
    except ImportError as e:
        raise ImportError("logging.backends includes 'wandb', but the wandb package is not installed: "
                          "pip install 'tspo-fast[wandb]' (or pip install wandb)") from e
    id_file = os.path.join(out_dir, "wandb_run_id")
    run_id = None
    if resume and os.path.exists(id_file):
        with open(id_file, encoding="utf-8") as f:
            run_id = f.read().strip() or None
    run = wandb.init(project=project, name=name, tags=tags or None, config=config, dir=out_dir, id=run_id,
                     resume="allow" if run_id else None)
    with open(id_file, "w", encoding="utf-8") as f:
        f.write(run.id + "\n")
    return run


def read_metrics(path: str) -> List[Dict[str, Any]]:
    """Rows of a metrics JSONL file (a torn last line from a crash is skipped)."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows
