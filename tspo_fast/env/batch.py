"""``RolloutBatch``: the one structure rollout hands to rewards, advantages and the trainer.

Rows are trajectories, right-padded to a common length L. Per token (shape (B, L)):

* ``input_ids``      int64  prompt ids, then the response (sampled ids + observation ids), then pad
* ``attention_mask`` int64  1 on prompt and response tokens, 0 on padding
* ``turn_id``        int32  turn k (0-based) on response tokens, -1 on prompt and padding
* ``is_obs``         bool   true on observation tokens
* ``loss_mask``      bool   ``turn_id >= 0 & ~is_obs`` (the sampled tokens)
* ``rollout_logp``   float32 the engine's log-prob of each sampled token, 0 elsewhere

Per row (shape (B,)): ``group_id`` int64 (from the prompt uid), ``num_turns`` int32,
``prompt_len`` int32, ``truncated`` bool, ``num_searches`` int32. Plain lists (len B):
``uids``, ``answer_text`` (str | None), ``action_texts`` (list[str] per turn),
``observation_texts`` (list[str] per turn, "" for a turn without observation), ``aliases``,
``data_source``. ``stats``: the rollout's counters and timings (:class:`RolloutStats`).
"""
from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from typing import Any, Dict, Sequence

import torch


def group_id_of(uid: Any) -> int:
    """Stable int64 group id for a prompt uid: the int itself, else a 63-bit hash of ``str(uid)``.

    The same uid gets the same id in every batch and process (no dataset-local index).
    """
    if isinstance(uid, int) and not isinstance(uid, bool) and -(2 ** 63) <= uid < 2 ** 63:
        return uid
    digest = hashlib.blake2b(str(uid).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2 ** 63 - 1)


@dataclass
class RolloutStats:
    """What one rollout call counted and timed (both agent loops fill the same fields).

    Seconds are wall-clock; ``gen_seconds`` inside the engine, ``retrieval_seconds`` inside
    retriever calls (summed over concurrent calls), ``retrieval_wait_seconds`` the part of it the
    engine had nothing to do.  The ``critical_*`` fields describe the trajectory whose own engine
    and retrieval seconds add up to the most (``tspo_fast.env.agent``: the bound no scheduling
    can beat).
    """

    gen_seconds: float = 0.0            # inside engine calls (generate, or the async loop's steps)
    retrieval_seconds: float = 0.0      # inside retriever calls
    retrieval_wait_seconds: float = 0.0  # waiting for the retriever with nothing to generate
    total_seconds: float = 0.0          # the whole rollout call
    generated_tokens: int = 0           # sampled by the engine (before the response budget cut)
    obs_tokens: int = 0                 # observation tokens appended
    engine_calls: int = 0               # generate calls (sync) or submitted requests (async)
    retrieval_calls: int = 0            # retriever calls (each a batch of queries)
    search_queries: int = 0             # queries sent to the retriever
    invalid_actions: int = 0            # turns without a parsable search or answer
    answered: int = 0                   # trajectories that gave an answer
    truncated: int = 0                  # trajectories cut (response budget or deadline)
    deadline_truncated: int = 0         # of which by rollout.max_seconds
    async_loop: bool = False            # the asynchronous loop ran (else the turn-synchronous one)
    critical_path_seconds: float = 0.0  # the longest trajectory's engine + retrieval seconds
    critical_engine_seconds: float = 0.0     # of which in the engine
    critical_retrieval_seconds: float = 0.0  # of which at the retriever
    critical_tokens: int = 0            # tokens sampled by that trajectory

    @property
    def engine_busy_frac(self) -> float:
        """Share of the rollout's wall-clock time spent inside the engine."""
        return self.gen_seconds / max(self.total_seconds, 1e-9)

    def as_dict(self) -> Dict[str, float]:
        """Every field and ``engine_busy_frac`` as floats, for logs and benchmark records."""
        out = {k: float(v) for k, v in dataclasses.asdict(self).items()}
        out["engine_busy_frac"] = self.engine_busy_frac
        return out


@dataclass
class Trajectory:
    """One trajectory as it grows during rollout (unpadded; lists are per response token)."""

    prompt_ids: list[int]
    uid: Any
    aliases: list[str] = field(default_factory=list)
    data_source: str = ""
    response_ids: list[int] = field(default_factory=list)
    turn_ids: list[int] = field(default_factory=list)
    is_obs: list[bool] = field(default_factory=list)
    logps: list[float] = field(default_factory=list)
    action_texts: list[str] = field(default_factory=list)
    observation_texts: list[str] = field(default_factory=list)
    answer_text: str | None = None
    num_turns: int = 0
    num_searches: int = 0
    truncated: bool = False
    done: bool = False

    def append(self, ids: Sequence[int], turn: int, obs: bool, logps: Sequence[float] | None = None) -> None:
        ids = list(ids)
        self.response_ids.extend(ids)
        self.turn_ids.extend([turn] * len(ids))
        self.is_obs.extend([obs] * len(ids))
        self.logps.extend(list(logps) if logps is not None else [0.0] * len(ids))

    @property
    def context(self) -> list[int]:
        return self.prompt_ids + self.response_ids


@dataclass
class RolloutBatch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    turn_id: torch.Tensor
    is_obs: torch.Tensor
    loss_mask: torch.Tensor
    rollout_logp: torch.Tensor
    group_id: torch.Tensor
    num_turns: torch.Tensor
    prompt_len: torch.Tensor
    truncated: torch.Tensor
    num_searches: torch.Tensor
    uids: list[Any]
    answer_text: list[str | None]
    action_texts: list[list[str]]
    observation_texts: list[list[str]]
    aliases: list[list[str]]
    data_source: list[str]
    stats: RolloutStats = field(default_factory=RolloutStats)

    _TENSORS = ("input_ids", "attention_mask", "turn_id", "is_obs", "loss_mask", "rollout_logp",
                "group_id", "num_turns", "prompt_len", "truncated", "num_searches")

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def to(self, device) -> "RolloutBatch":
        """A copy with every tensor on ``device`` (lists shared)."""
        kw = {k: getattr(self, k).to(device) for k in self._TENSORS}
        return RolloutBatch(**kw, uids=self.uids, answer_text=self.answer_text,
                            action_texts=self.action_texts, observation_texts=self.observation_texts,
                            aliases=self.aliases, data_source=self.data_source,
                            stats=dataclasses.replace(self.stats))

    def response_lengths(self) -> torch.Tensor:
        """(B,) int64: number of response tokens (actions + observations) per row."""
        return (self.turn_id >= 0).sum(dim=1)


def collate(trajs: Sequence[Trajectory], pad_id: int, pad_to_multiple: int = 1,
            stats: RolloutStats | None = None) -> RolloutBatch:
    """Right-pad trajectories into a ``RolloutBatch``; L is the longest row rounded up to
    ``pad_to_multiple``."""
    if not trajs:
        raise ValueError("collate: no trajectories")
    lengths = [len(t.prompt_ids) + len(t.response_ids) for t in trajs]
    L = max(lengths)
    L = ((L + pad_to_multiple - 1) // pad_to_multiple) * pad_to_multiple
    B = len(trajs)
    input_ids = torch.full((B, L), pad_id, dtype=torch.int64)
    attention_mask = torch.zeros((B, L), dtype=torch.int64)
    turn_id = torch.full((B, L), -1, dtype=torch.int32)
    is_obs = torch.zeros((B, L), dtype=torch.bool)
    rollout_logp = torch.zeros((B, L), dtype=torch.float32)
    for i, t in enumerate(trajs):
        p, n = len(t.prompt_ids), len(t.response_ids)
        input_ids[i, :p + n] = torch.tensor(t.prompt_ids + t.response_ids, dtype=torch.int64)
        attention_mask[i, :p + n] = 1
        if n:
            turn_id[i, p:p + n] = torch.tensor(t.turn_ids, dtype=torch.int32)
            is_obs[i, p:p + n] = torch.tensor(t.is_obs, dtype=torch.bool)
            rollout_logp[i, p:p + n] = torch.tensor(t.logps, dtype=torch.float32)
    loss_mask = (turn_id >= 0) & ~is_obs
    rollout_logp = torch.where(loss_mask, rollout_logp, torch.zeros_like(rollout_logp))
    return RolloutBatch(
        input_ids=input_ids, attention_mask=attention_mask, turn_id=turn_id, is_obs=is_obs,
        loss_mask=loss_mask, rollout_logp=rollout_logp,
        group_id=torch.tensor([group_id_of(t.uid) for t in trajs], dtype=torch.int64),
        num_turns=torch.tensor([t.num_turns for t in trajs], dtype=torch.int32),
        prompt_len=torch.tensor([len(t.prompt_ids) for t in trajs], dtype=torch.int32),
        truncated=torch.tensor([t.truncated for t in trajs], dtype=torch.bool),
        num_searches=torch.tensor([t.num_searches for t in trajs], dtype=torch.int32),
        uids=[t.uid for t in trajs], answer_text=[t.answer_text for t in trajs],
        action_texts=[list(t.action_texts) for t in trajs],
        observation_texts=[list(t.observation_texts) for t in trajs],
        aliases=[list(t.aliases) for t in trajs], data_source=[t.data_source for t in trajs],
        stats=dataclasses.replace(stats) if stats is not None else RolloutStats(),
    )
