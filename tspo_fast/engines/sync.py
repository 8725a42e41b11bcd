"""Stream trainer parameters into a rollout engine, in buckets of bounded size.

Works with plain ``nn.Module`` parameters and with DeepSpeed ZeRO-3 partitioned parameters:
for ZeRO-3 each bucket is gathered with ``deepspeed.zero.GatheredParameters`` (a collective:
every rank must call ``sync_weights``, with ``engine=None`` on ranks that hold no engine),
loaded into the engine while gathered, then released. Bucket sizes use ``ds_numel`` (the full
size), not the empty local ``numel()`` of a partitioned parameter.

Names are the Hugging Face names of the trainer module (``model.layers.0.self_attn.q_proj.weight``);
vLLM's ``load_weights`` maps them onto its fused layers. With tied embeddings the module lists
``model.embed_tokens.weight`` only and vLLM skips ``lm_head.weight``; both sides agree.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Iterable, Iterator

import deepspeed
import torch


@dataclass
class SyncStats:
    num_tensors: int = 0
    num_buckets: int = 0
    bytes: int = 0
    seconds: float = 0.0

    @property
    def seconds_per_gb(self) -> float:
        return self.seconds / (self.bytes / 1e9) if self.bytes else 0.0


def _full_numel(p: torch.Tensor) -> int:
    return int(getattr(p, "ds_numel", p.numel()))


def _is_zero3(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_id")


def _buckets(named_params: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int,
             dtype: torch.dtype | None) -> Iterator[list[tuple[str, torch.Tensor]]]:
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, p in named_params:
        nbytes = _full_numel(p) * (dtype or p.dtype).itemsize
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, p))
        size += nbytes
    if bucket:
        yield bucket


def _strip_prefix(name: str, prefix: str) -> str:
    return name[len(prefix):] if prefix and name.startswith(prefix) else name


def sync_weights(engine, named_params: Iterable[tuple[str, torch.Tensor]], bucket_mb: float = 256,
                 dtype: torch.dtype | None = None, name_prefix: str = "") -> SyncStats:
    """Load ``named_params`` into ``engine`` bucket by bucket; return timing and sizes.

    engine:       anything with ``load_weights(named_tensors)`` and ``reset_prefix_cache()``
                  (``sleep``/``wake_up`` used when ``engine.supports_sleep``); ``None`` on ranks
                  that only take part in the ZeRO-3 gathers.
    named_params: (name, parameter) pairs, e.g. ``ds_engine.module.named_parameters()``.
    bucket_mb:    upper bound of one gathered bucket in MB (a single larger tensor is its own bucket).
    dtype:        cast tensors to this dtype before loading (default: keep).
    name_prefix:  stripped from names (e.g. a wrapper's ``"module."``).
    """
    stats = SyncStats()
    t0 = time.perf_counter()
    sleeping = engine is not None and getattr(engine, "supports_sleep", False) and getattr(engine, "is_sleeping", False)
    if sleeping:
        engine.wake_up(tags=["weights"])
    bucket_bytes = int(bucket_mb * 1024 * 1024)
    for bucket in _buckets(named_params, bucket_bytes, dtype):
        zero3 = [p for _, p in bucket if _is_zero3(p)]
        if zero3:
            ctx = deepspeed.zero.GatheredParameters(zero3, modifier_rank=None)
        else:
            ctx = contextlib.nullcontext()
        with ctx, torch.no_grad():
            tensors = []
            for name, p in bucket:
                t = p.detach()
                if dtype is not None and t.dtype != dtype:
                    t = t.to(dtype)
                tensors.append((_strip_prefix(name, name_prefix), t))
                stats.bytes += t.numel() * t.element_size()
            if engine is not None:
                engine.load_weights(tensors)
            stats.num_tensors += len(tensors)
            stats.num_buckets += 1
            del tensors
    if engine is not None:
        if sleeping:
            engine.wake_up(tags=["kv_cache"])
        engine.reset_prefix_cache()
    stats.seconds = time.perf_counter() - t0
    return stats

