"""The rollout engine interface shared by the vLLM and Hugging Face engines, and the registry
of engines (``rollout.engine`` in a config).

An engine turns prompts given as token ids into sampled continuations, token ids in and
token ids out: ``generate(prompts_token_ids, SamplingConfig) -> list[Generation]``. Both
engines return, per prompt, the sampled ids (including the token that completes a stop
string, or the EOS token), the log-prob of each sampled id and the decoded text.

Log-probs are ``log_softmax(raw logits)`` of the sampled token: temperature 1, no top-p
truncation (vLLM's ``raw_logprobs`` mode). With the default temperature 1.0 that is the
behaviour policy the trainer recomputes.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Optional, Protocol, Sequence

import torch

from ..registry import Registry

FINISH_STOP = "stop"      # a stop string was generated (it is included in ids and text)
FINISH_EOS = "eos"        # an EOS / stop token id was generated (included in ids)
FINISH_LENGTH = "length"  # max_new_tokens reached
#: rollout.cpu_gemm: vLLM's packed oneDNN GEMMs on CPU, or F.linear (tspo_fast/engines/vllm_patches.py)
CPU_GEMMS = ("packed", "linear")


@dataclass(frozen=True)
class SamplingConfig:
    """How to sample one engine call.

    ``temperature == 0`` means greedy. ``seed`` (optional) makes sampling reproducible: request
    i of a call (or the request with key i, see ``Engine.generate``) uses
    ``mix_seed(seed, i)``.  ``stop`` are strings; ``stop_token_ids`` are extra ids that end a
    generation like EOS does.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 500
    stop: tuple[str, ...] = ()
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"SamplingConfig.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingConfig.top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingConfig.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))


@dataclass
class Generation:
    """One sampled continuation.

    token_ids: sampled ids (len T), ending with the stop-string-completing token or EOS if any.
    logprobs:  float log-prob of each sampled id (len T).
    text:      decoded text (special tokens skipped), cut right after the stop string if any.
    finish_reason: "stop" | "eos" | "length"; stop_str: the stop string matched, if any.
    """

    token_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: str
    stop_str: str | None = None


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integer parts (seed, step, rank, turn, row, ...): a hash, so different
    part tuples do not collide the way sums such as ``seed + step * world + rank`` do."""
    data = ",".join(str(int(p)) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") & (2 ** 63 - 1)


class Engine(Protocol):
    """What the agent loop and weight sync need from an engine.

    ``generate(prompts, sampling, keys=None)``: one call for a batch; ``keys`` (one int per
    prompt, default its index) name the requests for per-request seeds, so that a request's
    sample does not depend on which other requests share the call.  ``load_weights`` returns
    the names it loaded; ``weight_names()`` is what a complete sync must load; ``dtype`` the
    engine's parameter dtype (the sync sends tensors in it).  ``reset_prefix_cache`` returns
    whether the cache was reset.  An engine that post-processes loaded weights may also have a
    context manager ``batched_load()``: the sync loads all its buckets inside it, so the work is
    done once per sync (vLLM's CPU GEMM repack).

    Engines that can advance requests one by one (``supports_streaming``) also have
    ``submit(prompt_ids, sampling, key, priority=0) -> request id`` (lower priority values are
    scheduled first when requests wait for a slot), ``step() -> [(request id, Generation)]``
    for the requests that finished in that step, ``abort(request_ids)`` and ``num_pending()``:
    the asynchronous agent loop drives them.
    """

    max_model_len: int
    supports_sleep: bool
    supports_streaming: bool
    dtype: torch.dtype

    def generate(self, prompts_token_ids: Sequence[Sequence[int]], sampling: SamplingConfig,
                 keys: Optional[Sequence[int]] = None) -> list[Generation]: ...

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> set[str]: ...

    def weight_names(self) -> set[str]: ...

    def reset_prefix_cache(self) -> bool: ...

    def sleep(self, level: int = 2) -> None: ...

    def wake_up(self, tags: list[str] | None = None) -> None: ...


def find_stop(text: str, stops: Sequence[str]) -> tuple[int, str] | None:
    """Earliest end position (exclusive) of any stop string in ``text`` and which one."""
    best: tuple[int, str] | None = None
    for s in stops:
        i = text.find(s)
        if i >= 0 and (best is None or i + len(s) < best[0]):
            best = (i + len(s), s)
    return best


@dataclass(frozen=True)
class EngineSettings:
    """What a rollout engine is built from: the ``rollout`` section and the run's facts it needs.

    model_path: the model folder; dtype: ``rollout.dtype`` (null: ``model.dtype``); max_model_len: the context the rollout
    needs (``data.max_prompt_tokens + rollout.max_response_tokens``); seed: the run's ``seed``;
    rank, world: this process's rank and the world size; rollout: the ``RolloutConfig``, whose
    ``options`` (also :attr:`options`) are the engine's own settings.
    """

    model_path: str
    dtype: str
    max_model_len: int
    seed: int
    rollout: Any
    rank: int = 0
    world: int = 1

    @property
    def options(self) -> Mapping[str, Any]:
        return self.rollout.options

    @classmethod
    def from_config(cls, cfg, model_path: str, *, rank: int = 0, world: int = 1) -> "EngineSettings":
        return cls(model_path=model_path, dtype=cfg.rollout.dtype or cfg.model.dtype,
                   max_model_len=cfg.data.max_prompt_tokens + cfg.rollout.max_response_tokens, seed=cfg.seed,
                   rollout=cfg.rollout, rank=rank, world=world)


#: ``rollout.engine`` -> factory ``fn(settings: EngineSettings) -> Engine``; the built-ins take no options.
#: Entries are named by module: vLLM is an optional, heavy import, and the engine modules import
#: this one.
ENGINES: Registry[Callable[..., Engine]] = Registry("rollout.engine", {
    "hf": "tspo_fast.engines.hf:from_config",
    "vllm": "tspo_fast.engines.vllm:from_config",
}, role="factory", call=("settings",), options={"hf": (), "vllm": ()})

#: what the agent and the weight sync call on every engine (streaming engines: also STREAMING)
REQUIRED = ("generate", "load_weights", "reset_prefix_cache")
STREAMING = ("submit", "step", "abort", "num_pending")


def build_engine(cfg, model_path: str, *, rank: int = 0, world: int = 1) -> Engine:
    """The rollout engine of ``cfg.rollout.engine`` (a registered name or a plugin path) for the
    model folder ``model_path``; what the factory builds must have the engine's methods."""
    name = cfg.rollout.engine
    ENGINES.check(name, cfg.rollout.options)
    engine = ENGINES.get(name)(EngineSettings.from_config(cfg, model_path, rank=rank, world=world))
    wanted = REQUIRED + (STREAMING if getattr(engine, "supports_streaming", False) else ())
    missing = [m for m in wanted if not callable(getattr(engine, m, None))]
    if missing:
        raise TypeError(f"rollout.engine: {name!r} built a {type(engine).__name__} without "
                        f"{', '.join(missing)} (the Engine interface, tspo_fast.engines.base)")
    return engine
