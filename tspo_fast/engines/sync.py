"""The colocation cycle: the rollout engine sleeps during the update, then the trainer's
parameters stream into it in buckets of bounded size.

Per step: generate -> :func:`release_for_update` (``engine.sleep(2)``: weights and KV cache
freed, CUDA sleep mode) -> update -> :func:`sync_weights`: ``empty_cache`` -> wake the weights ->
load every bucket -> ``empty_cache`` -> wake the KV cache -> reset the prefix cache.  Each wake
allocates through vLLM's own allocator, outside PyTorch's cache: the blocks PyTorch still caches
(the update's activations before the first wake, the gathered buckets before the second) go back
to the driver first, or the KV cache's allocation can fail on memory PyTorch holds unused.  Every load is checked: the
engine must report loading all of its parameters (a partial sync is an error), tensors travel in
the engine's dtype, and the prefix-cache reset must succeed.

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
from typing import Iterable

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


def _entries(named_params):
    """(name, parameters, fn) per sent tensor: a plain (name, parameter) pair sends the parameter;
    a (name, [parameters], fn) triple sends ``fn(gathered parameters)`` (e.g. merged LoRA weights)."""
    for item in named_params:
        if len(item) == 3:
            yield item
        else:
            name, p = item
            yield name, [p], _first


def _first(ts):
    return ts[0]


def _buckets(entries, bucket_bytes: int, dtype: torch.dtype | None):
    bucket: list = []
    size = 0
    for name, params, fn in entries:
        nbytes = _full_numel(params[0]) * (dtype or params[0].dtype).itemsize
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, params, fn))
        size += nbytes
    if bucket:
        yield bucket


def _strip_prefix(name: str, prefix: str) -> str:
    return name[len(prefix):] if prefix and name.startswith(prefix) else name


class SyncError(RuntimeError):
    """A weight sync did not reach the whole engine (missing parameters, failed cache reset)."""


def empty_device_cache() -> None:
    """Return PyTorch's cached, unused CUDA blocks to the driver before the engine wakes (no-op on CPU)."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def release_for_update(engine) -> None:
    """After the rollout: let a sleep-capable engine free its memory for the update (level 2)."""
    if engine is not None and getattr(engine, "supports_sleep", False):
        engine.sleep(level=2)


def sync_weights(engine, named_params: Iterable[tuple[str, torch.Tensor]], bucket_mb: float = 256,
                 dtype: torch.dtype | None = None, name_prefix: str = "") -> SyncStats:
    """Load ``named_params`` into ``engine`` bucket by bucket; return timing and sizes.

    engine:       anything with ``load_weights(named_tensors) -> loaded names`` and
                  ``reset_prefix_cache() -> bool`` (``weight_names()``, ``dtype``,
                  ``sleep``/``wake_up`` and the context manager ``batched_load()``, around all
                  the buckets' loads, used where present); ``None`` on ranks that only take part
                  in the ZeRO-3 gathers.
    named_params: (name, parameter) pairs, e.g. ``ds_engine.module.named_parameters()``, or
                  (name, [parameters], fn) triples whose sent tensor is ``fn`` of the gathered
                  parameters (``tspo_fast.training.lora.merged_weight_entries``).
    bucket_mb:    upper bound of one gathered bucket in MB (a single larger tensor is its own bucket).
    dtype:        cast tensors to this dtype before loading (default: the engine's ``dtype``).
    name_prefix:  stripped from names (e.g. a wrapper's ``"module."``).

    Raises :class:`SyncError` when the engine did not load all of ``weight_names()`` or its
    prefix cache could not be reset.
    """
    stats = SyncStats()
    t0 = time.perf_counter()
    if dtype is None and engine is not None:
        dtype = getattr(engine, "dtype", None)
    sleeping = engine is not None and getattr(engine, "supports_sleep", False) and getattr(engine, "is_sleeping", False)
    if sleeping:
        empty_device_cache()
        engine.wake_up(tags=["weights"])
    loaded: set = set()
    bucket_bytes = int(bucket_mb * 1024 * 1024)
    # an engine that post-processes what it loads (vLLM's packed CPU GEMMs) does it once, after the last bucket
    batched = getattr(engine, "batched_load", None)
    with batched() if batched is not None else contextlib.nullcontext():
        for bucket in _buckets(_entries(named_params), bucket_bytes, dtype):
            zero3 = [p for _, params, _ in bucket for p in params if _is_zero3(p)]
            if zero3:
                ctx = deepspeed.zero.GatheredParameters(zero3, modifier_rank=None)
            else:
                ctx = contextlib.nullcontext()
            with ctx, torch.no_grad():
                tensors = []
                for name, params, fn in bucket:
                    t = fn([p.detach() for p in params])
                    if dtype is not None and t.dtype != dtype:
                        t = t.to(dtype)
                    tensors.append((_strip_prefix(name, name_prefix), t))
                    stats.bytes += t.numel() * t.element_size()
                if engine is not None:
                    loaded |= set(engine.load_weights(tensors) or ())
                stats.num_tensors += len(tensors)
                stats.num_buckets += 1
                del tensors
    if engine is not None:
        expected = engine.weight_names() if hasattr(engine, "weight_names") else set()
        missing = sorted(expected - loaded)
        if missing:
            shown = ", ".join(missing[:5]) + (f", ... ({len(missing) - 5} more)" if len(missing) > 5 else "")
            raise SyncError(f"weight sync reached {len(expected) - len(missing)} of the engine's {len(expected)} "
                            f"parameters; not loaded: {shown}")
        if sleeping:
            empty_device_cache()                 # the gathered buckets' blocks, before the KV cache's
            engine.wake_up(tags=["kv_cache"])
        if engine.reset_prefix_cache() is False:
            raise SyncError("weight sync: the engine's prefix cache could not be reset (requests still running?); "
                            "its cached prefixes would hold the old weights' keys and values")
    stats.seconds = time.perf_counter() - t0
    return stats

