"""Input validation shared by the Triton launchers and the PyTorch references.

Every check raises ``ValueError`` (shapes, values, options) or ``TypeError`` (dtypes,
devices, non-tensors) with a message naming the argument.
"""
from __future__ import annotations

import math
import numbers
import os
from typing import Iterable, Sequence

import torch

INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def tensor(name: str, x, *, ndim: int | None = None, dtypes: Sequence[torch.dtype] | None = None,
           shape: Sequence[int] | None = None) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {tuple(x.shape)}")
    if dtypes is not None and x.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} has dtype {str(x.dtype).replace('torch.', '')}; expected one of: {allowed}")
    if shape is not None and tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(x.shape)}; expected {tuple(shape)}")
    return x


def same_device(**tensors: torch.Tensor) -> torch.device:
    """All named tensors must live on one device; returns it."""
    items = [(k, v) for k, v in tensors.items() if v is not None]
    dev = items[0][1].device
    for _, v in items[1:]:
        if v.device != dev:
            where = ", ".join(f"{n} on {t.device}" for n, t in items)
            raise TypeError(f"all inputs must be on one device, got {where}")
    return dev


def choice(name: str, value: str, allowed: Iterable[str]) -> str:
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; expected one of {', '.join(map(repr, allowed))}")
    return value


# --------------------------------------------------------------------------- option names
#: every kernel's ``backend``: "auto" (Triton on CUDA, PyTorch elsewhere), "triton" (the kernel;
#: on CPU only under ``TRITON_INTERPRET=1``), "torch" (the PyTorch path: for K1/K2 the reference,
#: for K3 its chunked PyTorch path), "reference" (the plain math of ``tspo_kernels.reference``).
BACKENDS = ("auto", "triton", "torch", "reference")
#: K1 ``source``: where an answer must occur (docs/algorithm.md §2)
FOLR_SOURCES = ("observation", "action", "any")
#: K2 ``mode`` and ``norm`` (docs/algorithm.md §3): "tspo" (turn-level returns), "grpo" (outcome
#: only), "tspo_stage" (GRPO in groups whose outcomes differ, "tspo" in groups whose outcomes coincide),
#: "tspo_placebo" (a control: "tspo" with each group's FOLR bonuses moved to random members and turns)
ADV_MODES = ("tspo", "grpo", "tspo_stage", "tspo_placebo")
ADV_NORMS = ("group", "turn")


#: Triton runs its interpreter (``TRITON_INTERPRET=1``, read when the kernels are defined): the
#: launchers then pick small blocks (each program costs milliseconds there) and upcast what the
#: interpreter computes wrongly (bf16 products); compiled, they pick the GPU configurations
#: whatever device the tensors report.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def use_triton(backend: str, device: torch.device) -> bool:
    """Resolve ``backend`` (one of :data:`BACKENDS`) for tensors on ``device``: True for Triton."""
    choice("backend", backend, BACKENDS)
    if backend == "auto":
        return device.type == "cuda"
    return backend == "triton"


# --------------------------------------------------------------------------- K1, K2 inputs
_FLAG_DTYPES = (torch.bool,) + INT_DTYPES


def first_occurrence_args(token_ids, turn_id, is_obs, patterns, source):
    """Validate K1 inputs; returns (B, L)."""
    tensor("token_ids", token_ids, ndim=2, dtypes=INT_DTYPES)
    B, L = token_ids.shape
    tensor("turn_id", turn_id, dtypes=INT_DTYPES, shape=(B, L))
    tensor("is_obs", is_obs, dtypes=_FLAG_DTYPES, shape=(B, L))
    choice("source", source, FOLR_SOURCES)
    for field in ("ids", "offsets", "row_offsets"):
        if not hasattr(patterns, field):
            raise TypeError("patterns must be a PackedPatterns (see tspo_kernels.pack_patterns)")
        tensor(f"patterns.{field}", getattr(patterns, field), ndim=1, dtypes=INT_DTYPES)
    if patterns.row_offsets.numel() != B + 1:
        raise ValueError(f"patterns hold {patterns.row_offsets.numel() - 1} rows but token_ids has {B} rows")
    same_device(token_ids=token_ids, turn_id=turn_id, is_obs=is_obs, patterns_ids=patterns.ids,
                patterns_offsets=patterns.offsets, patterns_row_offsets=patterns.row_offsets)
    return B, L


def finite_number(name: str, value) -> float:
    """A real, finite Python number (bool excluded); returns it as float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def turn_advantages_args(outcome, first_turn, num_turns, group_ids, turn_id, loss_mask, mode, norm, gamma, eps,
                         alpha=0.0):
    """Validate K2 inputs (shapes, dtypes, devices, options); returns (B, L).

    Values of tensors are not read here (that would cost a device sync on CUDA): see
    :func:`num_turns_values`.
    """
    tensor("outcome", outcome, ndim=1, dtypes=FLOAT_DTYPES)
    B = outcome.shape[0]
    tensor("first_turn", first_turn, dtypes=INT_DTYPES, shape=(B,))
    tensor("num_turns", num_turns, dtypes=INT_DTYPES, shape=(B,))
    tensor("group_ids", group_ids, dtypes=INT_DTYPES, shape=(B,))
    tensor("turn_id", turn_id, ndim=2, dtypes=INT_DTYPES)
    if turn_id.shape[0] != B:
        raise ValueError(f"turn_id has {turn_id.shape[0]} rows but outcome has {B}")
    tensor("loss_mask", loss_mask, dtypes=_FLAG_DTYPES, shape=tuple(turn_id.shape))
    same_device(outcome=outcome, first_turn=first_turn, num_turns=num_turns, group_ids=group_ids,
                turn_id=turn_id, loss_mask=loss_mask)
    choice("mode", mode, ADV_MODES)
    choice("norm", norm, ADV_NORMS)
    finite_number("alpha", alpha)
    if not 0.0 <= finite_number("gamma", gamma) <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    if not finite_number("eps", eps) > 0.0:
        raise ValueError(f"eps must be > 0, got {eps}")
    return B, turn_id.shape[1]


def num_turns_values(num_turns: torch.Tensor) -> int:
    """Reject negative turn counts (ValueError naming the first bad row); returns max(num_turns)
    (0 for no rows).  Reads the tensor: one device-to-host transfer on CUDA."""
    if num_turns.numel() == 0:
        return 0
    lo, hi = torch.stack([num_turns.min(), num_turns.max()]).tolist()
    if lo < 0:
        row = int((num_turns < 0).nonzero()[0, 0])
        raise ValueError(f"num_turns must be >= 0; num_turns[{row}] = {int(num_turns[row])}")
    return int(hi)
