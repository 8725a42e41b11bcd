"""The TSPO trainer: one step = rollout -> rewards -> advantages -> log-probs -> update -> sync.

The actor (and the frozen reference) are DeepSpeed engines (ZeRO-3 by default); the rollout
engine (vLLM or HF ``generate``) is colocated in the same process and receives the actor's
weights after every optimizer step, gathered bucket by bucket.  Scale-out is DeepSpeed's:
launch with ``deepspeed`` (hostfile, several nodes) or ``torchrun``; each rank rolls out its
share of the step's prompts with its own engine, and DeepSpeed averages gradients.  The update
itself (exact global normaliser, PPO epochs) is :mod:`tspo_fast.training.ppo`.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import warnings
from typing import Any, Dict, List, Optional

import torch
from tqdm import tqdm

from ..algo.advantages import AdvantageSettings, batch_advantages
from ..algo.rewards import score_batch
from ..config import Config, ConfigError, dump_config
from ..data import QAExample, drop_long_prompts, prompt_items
from ..engines.base import mix_seed
from ..engines.sync import release_for_update, sync_weights
from ..models import load_policy, resolve_model_path
from .builders import build_actor, build_agent, build_engine, build_reference, build_retriever, load_data
from .checkpoint import (
    MANIFEST,
    CheckpointError,
    apply_optimizer_settings,
    consolidated_state,
    export_hf,
    find_checkpoint,
    list_checkpoints,
    load_checkpoint,
    read_state,
    resume_changes,
    save_checkpoint,
)
from .distributed import (
    barrier,
    global_max,
    init_distributed,
    local_device,
    rank,
    seed_everything,
    shutdown,
    world_size,
)
from .evaluate import evaluate
from .guard import DivergenceError, DivergenceGuard, describe_nonfinite, parameter_health, update_kl
from .locks import lock_output_dir
from .lora import disabled_adapters, export_lora, is_lora, merged_weight_entries
from .metrics import MetricsLogger, phase, step_metrics
from .plan import GIB, plan_memory
from .ppo import compute_logprobs, gradient_accumulation_steps, plan_update, ppo_update

__all__ = ["Trainer", "preflight"]

# DeepSpeed 0.19 calls torch.distributed collectives that torch 2.13 marks deprecated, once per
# gather: keep the training log readable.
warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use `torch\.distributed", category=FutureWarning)


def preflight(cfg: Config, world: int) -> None:
    """On CUDA, before anything is allocated: the memory plan (``tspo-fast plan``) must fit what is
    free on this rank's own GPU (``cuda:LOCAL_RANK``; another process there counts against it)."""
    if not (torch.cuda.is_available() and cfg.train.memory_check):
        return
    device = local_device()
    free, total = torch.cuda.mem_get_info(device)
    plan = plan_memory(cfg, world, total / GIB, free_gib=free / GIB, model_path=resolve_model_path(cfg.model.path, cfg.model.gguf_file))
    if not plan.fits:
        raise ConfigError(f"the run does not fit the memory free on {device} (set train.memory_check: false to try "
                          "anyway):\n" + plan.table())


class Trainer:
    """Builds every part from a :class:`Config` and runs :meth:`fit`."""

    def __init__(self, cfg: Config, *, resume=None, quiet: bool = False):
        """``resume``: None/False (a fresh run), True or ``"latest"``, ``"auto"``, or a checkpoint
        folder (:func:`~tspo_fast.training.checkpoint.find_checkpoint`)."""
        self.cfg = cfg
        self.quiet = quiet
        init_distributed()
        self.rank, self.world = rank(), world_size()
        self._run_lock = lock_output_dir(cfg.output_dir, say=self._say)    # one run per output_dir (collective)
        try:
            self._build(resume)
        except BaseException:
            self._release_run_lock()
            raise

    def _build(self, resume) -> None:
        """Every part of the run, once its output_dir is locked."""
        cfg = self.cfg
        seed_everything(cfg.seed + self.rank)
        self.gas = gradient_accumulation_steps(cfg, self.world)
        os.makedirs(cfg.output_dir, exist_ok=True)

        preflight(cfg, self.world)
        self.model_path, self.tokenizer, self.lm = load_policy(cfg.model.path, cfg.model.dtype, cfg.model.gguf_file)
        self.actor = build_actor(cfg, self.lm, self.gas)
        self.ref = build_reference(cfg, self.model_path, self.gas)
        self.train_examples, self.test_examples = load_data(cfg)
        self.retriever = build_retriever(cfg.retrieval)
        self.engine = build_engine(cfg, self.model_path, rank=self.rank, world=self.world)
        self.agent = build_agent(cfg, self.engine, self.retriever, self.tokenizer)
        self.ckpt_root = os.path.join(cfg.output_dir, "checkpoints")
        for what in ("training", "test"):            # over-long prompts: skipped and counted, or an error
            name = "train_examples" if what == "training" else "test_examples"
            if getattr(self, name):
                kept, report = drop_long_prompts(getattr(self, name), self.tokenizer, cfg.data.chat_template,
                                                 cfg.data.max_prompt_tokens, policy=cfg.data.overlong_prompts, what=what)
                setattr(self, name, kept)
                if report:
                    self._say(f"data: {report}")
        self.step = 0
        self._nonfinite: Dict[str, int] = {}       # trained parameters left non-finite by the last update
        self._keep: List[str] = []                 # checkpoint folders pruning must keep (an unverified load)
        self.checkpoint: Optional[str] = None      # the checkpoint folder this run wrote last (or resumed from)
        resumed = self._resume(resume) if resume else False
        if self.rank == 0:               # after the resume check: a config it refuses is not recorded
            dump_config(cfg, os.path.join(cfg.output_dir, "config.yaml"))
        self.logger = MetricsLogger.from_config(cfg, enabled=self.rank == 0, resume_step=self.step if resumed else None)
        self.guard = DivergenceGuard(cfg, self.step)
        self._saved_step: Optional[int] = self.step if resumed else None
        self._stop = False
        self._stop_signal: Optional[str] = None
        self._in_step = False
        self._saving = False
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._on_signal)
            signal.signal(signal.SIGINT, self._on_signal)

    def _resume(self, mode) -> bool:
        """Load the checkpoint ``--resume`` asks for: verified against its manifest, its config
        compared with this run's (refused changes raise; applied ones are reported).  False when
        ``--resume auto`` finds no checkpoint at all (a fresh start)."""
        folder = find_checkpoint(self.ckpt_root, "latest" if mode is True else str(mode))
        if folder is None:
            self._say(f"resume: no checkpoint under {self.ckpt_root}; starting at step 0")
            return False
        for line in resume_changes(read_state(folder), self.cfg, self.world):
            self._say(f"resume: {line}")
        self.step = int(load_checkpoint(self.actor, folder, exclude_frozen=bool(self.cfg.model.lora.rank))["step"])
        _, bad = parameter_health(self.actor.module)      # collective: every rank gets the same answer
        if bad:
            raise CheckpointError(f"{folder}: the checkpoint holds non-finite weights: {describe_nonfinite(bad)}; "
                                  "resume from an older checkpoint (--resume CHECKPOINT)")
        if not os.path.isfile(os.path.join(folder, MANIFEST)):
            self._keep.append(folder)     # loaded unverified: this run never prunes it, so checkpoints grown from
                                          # unchecked files are never the only ones kept
        apply_optimizer_settings(self.actor, self.cfg)      # DeepSpeed restored the checkpoint's lr
        self.checkpoint = folder
        self._say(f"resume: continuing from {folder} (step {self.step})")
        self.sync()
        return True

    # -- helpers
    def _release_run_lock(self) -> None:
        if self._run_lock is not None:
            self._run_lock.release()

    def _say(self, msg: str) -> None:
        if self.rank == 0:
            tqdm.write(msg, file=sys.stderr)

    def _on_signal(self, signum, frame) -> None:
        """SIGTERM / SIGINT: finish the step, save, stop.  A second SIGINT stops at once, except
        while a checkpoint is being written: that write always finishes first (an interrupted one
        would leave no checkpoint where it is the first), then the run stops."""
        name = signal.Signals(signum).name
        if self._saving:
            self._stop = True
            self._stop_signal = self._stop_signal or name
            self._say(f"{name}: a checkpoint is being written; it finishes first, then the run stops")
            return
        if self._stop and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self._stop = True
        self._stop_signal = name
        self._say(f"{self._stop_signal}: finishing the current step, then writing a checkpoint"
                  + (" (Ctrl-C again to stop at once)" if signum == signal.SIGINT else ""))

    def prompts_for_step(self, step: int) -> List[QAExample]:
        """This rank's prompts of ``step``: a seeded permutation per epoch, consumed in order."""
        P = self.cfg.train.prompts_per_step
        n = len(self.train_examples)
        out = []
        for j in range(step * P, (step + 1) * P):
            epoch, i = divmod(j, n)
            g = torch.Generator().manual_seed(self.cfg.seed * 7919 + epoch)
            order = torch.randperm(n, generator=g) if self.cfg.data.shuffle else torch.arange(n)
            out.append(self.train_examples[int(order[i])])
        per = P // self.world
        return out[self.rank * per:(self.rank + 1) * per]

    def rollout_seed(self, step: int) -> int:
        """The sampling seed of ``step`` on this rank (a hash of seed, step and rank: no collisions)."""
        return mix_seed(self.cfg.seed, step, self.rank)

    def sync(self) -> float:
        """The actor's weights (LoRA merged) into the rollout engine, bucket by bucket."""
        lm = self.actor.module.lm
        named = merged_weight_entries(lm) if is_lora(lm) else lm.named_parameters()
        return sync_weights(self.engine, named, bucket_mb=self.cfg.rollout.sync_bucket_mb).seconds

    # -- one step
    def train_step(self) -> Dict[str, float]:
        cfg = self.cfg
        times: Dict[str, float] = {}
        with phase(times, "time/step"):
            with phase(times, "time/rollout"):
                items = prompt_items(self.prompts_for_step(self.step), self.tokenizer, cfg.data.chat_template)
                batch = self.agent.rollout(items, seed=self.rollout_seed(self.step))
                release_for_update(self.engine)            # the engine sleeps (CUDA) while the update runs
            times["time/rollout_generate"] = batch.stats.gen_seconds
            times["time/rollout_retrieval_wait"] = batch.stats.retrieval_wait_seconds
            times["time/rollout_critical_path"] = batch.stats.critical_path_seconds

            with phase(times, "time/reward_advantage"):
                outcome, first_turn = score_batch(batch, self.tokenizer, outcome=cfg.reward.outcome,
                                                  source=cfg.reward.folr_source)
                token_adv, turn_adv = batch_advantages(
                    batch, outcome, first_turn,
                    AdvantageSettings.from_config(cfg, seed=mix_seed(cfg.seed, self.step, 0)))

            with phase(times, "time/logprobs"):
                plan = plan_update(batch, token_adv, cfg, self.actor.device)   # micro-batches on the device, once
                if not plan.on_policy:                                          # pi_old = pi when exactly on-policy
                    compute_logprobs(self.actor, plan, "old_logp")
                if self.ref is not None:                                        # kl_coef > 0
                    compute_logprobs(self.ref, plan, "ref_logp")
                elif cfg.loss.kl_coef > 0 and cfg.model.lora.rank:             # LoRA: the frozen base is pi_ref
                    with disabled_adapters(self.actor.module.lm):
                        compute_logprobs(self.actor, plan, "ref_logp")

            with phase(times, "time/update"):
                upd = ppo_update(self.actor, plan, cfg)

            with phase(times, "time/health"):              # the result of the update, judged by the guard
                param_norm, self._nonfinite = parameter_health(self.actor.module)
                kl = (update_kl(self.actor, plan.micro()[0], upd.before_logp)
                      if cfg.train.max_update_kl > 0 and not self._nonfinite else None)

            with phase(times, "time/sync"):
                self.sync()
            self.step += 1
        m = step_metrics(batch, outcome, first_turn, token_adv, turn_adv, upd, times,
                         outcome_kind=cfg.reward.outcome, plan=plan)
        m["train/param_norm"] = param_norm
        if kl is not None:
            m["train/update_kl"] = kl
        return m

    def save(self, *, healthy: bool = True) -> str:
        """Checkpoint the state after ``self.step`` (collective), with this run's config and world
        size (compared on resume) and the step's health (pruning keeps the newest healthy one)."""
        state = {"step": self.step, "data_position": self.step * self.cfg.train.prompts_per_step,
                 "seed": self.cfg.seed, "healthy": healthy, "world_size": self.world, "config": self.cfg.to_dict()}
        self._saving = True              # SIGINT / SIGTERM now wait for the checkpoint (_on_signal)
        try:
            folder = save_checkpoint(self.actor, self.ckpt_root, self.step, state,
                                     keep=self.cfg.train.keep_checkpoints, exclude_frozen=bool(self.cfg.model.lora.rank),
                                     protect=self._keep)
        finally:
            self._saving = False
        self._saved_step = self.step
        self.checkpoint = folder
        return folder

    def export(self, out_dir: str, fmt: str = "merged") -> Optional[str]:
        """Write the policy in Hugging Face format (collective; rank 0 writes).  LoRA runs:
        ``fmt="merged"`` the base with the adapters merged in, ``"adapter"`` the adapter alone."""
        if fmt not in ("merged", "adapter"):
            raise ConfigError(f"--export-format: must be 'merged' or 'adapter', got {fmt!r}")
        if not self.cfg.model.lora.rank:
            if fmt == "adapter":
                raise ConfigError("--export-format adapter: this run has no LoRA adapters (model.lora.rank is 0)")
            return export_hf(self.actor, self.lm, self.tokenizer, out_dir)
        state = consolidated_state(self.actor)          # collective: every rank takes part
        if self.rank != 0:
            return None
        state = {k[len("lm."):] if k.startswith("lm.") else k: v for k, v in state.items()}
        return export_lora(state, self.model_path, self.cfg.model.lora, out_dir, merged=fmt == "merged",
                           tokenizer=self.tokenizer, dtype=getattr(torch, self.cfg.model.dtype))

    def evaluate(self, examples=None, *, limit: Optional[int] = None) -> Dict[str, Any]:
        return evaluate(self.agent, self.tokenizer, examples if examples is not None else self.test_examples,
                        chat_template=self.cfg.data.chat_template, limit=limit, folr_source=self.cfg.reward.folr_source)

    def fit(self, max_steps: Optional[int] = None) -> Dict[str, float]:
        """Train until ``train.total_steps`` (or ``max_steps`` more steps, or SIGTERM / SIGINT).

        A checkpoint is written every ``train.checkpoint_every`` healthy steps and at the end: of
        the run, after a signal, and (one rank) after an exception in the loop when the state is
        still that of the last completed healthy step.  The divergence guard stops the run without
        writing one (:mod:`tspo_fast.training.guard`)."""
        cfg = self.cfg
        end = cfg.train.total_steps if max_steps is None else min(cfg.train.total_steps, self.step + max_steps)
        last: Dict[str, float] = {}
        if self.step >= cfg.train.total_steps:
            self._say(f"the run is already finished: it is at step {self.step} and train.total_steps is "
                      f"{cfg.train.total_steps}; nothing to train (to go on, raise train.total_steps above {self.step})")
        if self.step == 0 and cfg.train.eval_at_start and cfg.train.eval_every and self.test_examples and end > 0:
            ev = self.evaluate()
            self.logger.log(0, {f"eval/{k}": v for k, v in ev["overall"].items()})
        bar = tqdm(total=end, initial=self.step, desc="train", disable=self.quiet or self.rank != 0, dynamic_ncols=True)
        healthy = True                       # the state after self.step is that of a healthy step
        opt_steps = self.actor.global_steps
        try:
            while self.step < end and not self._stop_agreed():
                skipped, opt_steps = self.actor.skipped_steps, self.actor.global_steps
                self._in_step = True
                last = self.train_step()
                self._in_step = False
                try:
                    healthy = self.guard.check(self.step, last, skipped=self.actor.skipped_steps - skipped,
                                               nonfinite=self._nonfinite)
                except DivergenceError as e:
                    self.logger.log(self.step, last)
                    raise DivergenceError(f"{e}; {self._kept('no checkpoint was written for the diverged steps')}") \
                        from None
                if cfg.train.eval_every and self.step % cfg.train.eval_every == 0 and self.test_examples:
                    ev = self.evaluate()
                    last.update({f"eval/{k}": v for k, v in ev["overall"].items()})
                self.logger.log(self.step, last)
                bar.update(1)
                bar.set_postfix(reward=f"{last['reward/mean']:.3f}", folr=f"{last['reward/folr_hit']:.2f}",
                                turns=f"{last['rollout/turns']:.2f}")
                if cfg.train.checkpoint_every and self.step % cfg.train.checkpoint_every == 0:
                    if healthy:
                        self.save()
                    else:
                        self._say(f"step {self.step}: checkpoint not written (an optimizer step was skipped for "
                                  "non-finite gradients)")
        except DivergenceError:
            bar.close()
            raise
        except BaseException as e:       # any error, a second Ctrl-C: save what is consistent, then re-raise
            bar.close()
            self._save_after_error(e, healthy, mid_update=self._in_step and self.actor.global_steps != opt_steps)
            raise
        bar.close()
        if healthy and self.step > 0 and self._saved_step != self.step:
            self.save()
        if self._stop and self.step < end:        # (a signal during the final save: the run is complete)
            self._say(f"stopped by {self._stop_signal} after step {self.step}; {self._kept('')}; continue with --resume")
        return last

    def _stop_agreed(self) -> bool:
        """Whether any rank got SIGTERM / SIGINT (all ranks stop after the same step)."""
        self._stop = global_max(1.0 if self._stop else 0.0) > 0
        return self._stop

    def _kept(self, prefix: str) -> str:
        found = list_checkpoints(self.ckpt_root)
        newest = f"the newest checkpoint is {found[-1][1]}" if found else f"there is no checkpoint under {self.ckpt_root}"
        return f"{prefix}; {newest}" if prefix else newest

    def _save_after_error(self, error: BaseException, healthy: bool, mid_update: bool) -> None:
        """Best effort after an exception in the step loop: a checkpoint of the last completed step,
        when the weights are still exactly its weights, it was healthy and it is not saved yet."""
        what = type(error).__name__
        if mid_update:
            why = f"the {what} came after an optimizer step of step {self.step + 1} (the state is mid-step)"
        elif not healthy:
            why = f"step {self.step} was not healthy"
        elif self.step == 0 or self._saved_step == self.step:
            return
        elif self.world > 1:
            why = "the other ranks may not reach a collective save (world size > 1)"
        else:
            try:
                folder = self.save()
            except Exception as e:  # best effort: report, then re-raise the original error
                self._say(f"{what}: the checkpoint of step {self.step} could not be written ({type(e).__name__}: {e})")
                return
            self._say(f"{what}: wrote {folder} (step {self.step}) before stopping; continue with --resume")
            return
        self._say(f"{what}: no checkpoint written ({why}); {self._kept('')}")

    def close(self) -> None:
        """Close the metrics log, the rollout engine and the process group, in that order: vLLM's
        own shutdown tears down the process groups it joined (the default one included), so it
        runs first, once every rank is done, instead of at interpreter exit after them."""
        self.logger.close()
        barrier()
        close_engine = getattr(self.engine, "close", None)
        if close_engine is not None:
            close_engine()
        shutdown()
        self._release_run_lock()
