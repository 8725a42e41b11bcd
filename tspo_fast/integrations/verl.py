"""TSPO for veRL (written against veRL 0.9's ``register_adv_est`` interface; veRL is optional).

veRL calls a registered advantage estimator as
``fn(token_level_rewards=(bs, L) float, response_mask=(bs, L), index=uid array, config=AlgoConfig)``
and nothing else, so TSPO's per-turn rewards travel inside ``token_level_rewards``:

* turns are the runs of ``response_mask == 1`` (veRL's multi-turn agent loop sets 0 on tool /
  environment tokens): turn k = the k-th run of policy tokens and the observation after it;
* :func:`folr_token_level_rewards` writes docs/algorithm.md §2's turn rewards there: FOLR's ``alpha`` on the
  last policy token of turn k*, the outcome R on the last policy token of the last turn.
  :func:`folr_first_turn` finds k* from the response token ids with kernel K1; the reward
  manager ``"tspo"`` does both: ``TSPORewardLoopManager`` for veRL's reward loop (0.9), a
  subclass of its "naive" manager, and :class:`TSPORewardManager` for the older
  ``AbstractRewardManager`` interface;
* :func:`compute_tspo_advantage` (registered as ``"tspo"`` when veRL is importable: set
  ``algorithm.adv_estimator=tspo``) sums the rewards of each turn, recovers (R, k*, K) and runs
  kernel K2: docs/algorithm.md §3's turn-level, group-normalised advantages on every policy token.

A trajectory whose last turn is also its first-occurrence turn carries ``R + alpha`` there; it
is read back as outcome ``R + alpha`` with no k*, which gives the same returns, hence the same
advantages.  Importing this module never needs veRL; where veRL is importable it registers
both.  Tested against veRL 0.9.1 itself (tests/test_integration_verl.py): the estimator through
``core_algos``' registry and ``ray_trainer.compute_advantage`` on a ``DataProto``, the reward
manager through ``RewardLoopManager.compute_rm_score`` (Ray workers, ``source=importlib``).
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Tuple

import torch

import tspo_kernels as tk

from ..algo.rewards import outcome_reward
from .segments import Turns, turns_from_action_mask

__all__ = ["FolrScore", "TSPORewardLoopManager", "TSPORewardManager", "compute_tspo_advantage", "folr_rm_scores",
           "item_first_turn", "folr_first_turn", "folr_token_level_rewards",
           "make_tspo_estimator", "register_tspo_estimator", "turn_rewards"]


def _group_ids(index: Any, n: int, device) -> torch.Tensor:
    """(n,) int64 group ids from veRL's ``uid`` array (strings or ints), in order of appearance."""
    if isinstance(index, torch.Tensor):
        values = index.tolist()
    else:
        values = list(index)
    if len(values) != n:
        raise ValueError(f"index has {len(values)} entries but token_level_rewards has {n} rows")
    ids: dict = {}
    return torch.tensor([ids.setdefault(v, len(ids)) for v in values], dtype=torch.long, device=device)


def turn_rewards(token_level_rewards: torch.Tensor, response_mask: torch.Tensor) -> Tuple[torch.Tensor, Turns]:
    """Per-turn reward sums (bs, T) float64 and the turn segmentation of ``response_mask``.

    A reward on an observation token counts for the turn it belongs to; rewards after the last
    policy token (veRL puts the score on the last *valid* token, which may be an observation)
    count for the last turn.
    """
    act = response_mask.bool()
    prev = torch.zeros_like(act)
    prev[:, 1:] = act[:, :-1]
    span = ((act & ~prev).long().cumsum(1) - 1).clamp(min=0)      # token -> turn, incl. trailing tokens
    turns = turns_from_action_mask(act)
    T = max(int(turns.num_turns.max()) if act.shape[0] else 1, 1)
    r = torch.zeros(act.shape[0], T, dtype=torch.float64, device=act.device)
    r.scatter_add_(1, span.clamp(max=T - 1), token_level_rewards.double())
    return r, turns


def compute_tspo_advantage(token_level_rewards: torch.Tensor, response_mask: torch.Tensor, index: Any,
                           config: Any = None, *, alpha: float = 0.5, gamma: float = 1.0, norm: str = "group",
                           eps: float = 1e-6, atol: float = 1e-5, **unused) -> Tuple[torch.Tensor, torch.Tensor]:
    """docs/algorithm.md §3 TSPO advantages for a veRL batch: ``(advantages, returns)``, both (bs, L) float32.

    token_level_rewards (bs, L) float: docs/algorithm.md §2 turn rewards as :func:`folr_token_level_rewards`
    places them (a plain outcome reward on the last token is TSPO with no FOLR hit).
    response_mask (bs, L): 1 on policy tokens.  index: (bs,) prompt uids (veRL's
    ``non_tensor_batch["uid"]``).  ``config`` (veRL's AlgoConfig) is accepted and unused: the
    options are fixed at registration (:func:`register_tspo_estimator`).  ``returns`` equals
    ``advantages`` (as veRL's GRPO estimator does).  Raises ValueError when a row's non-final
    turns carry rewards other than one ``alpha``.
    """
    if token_level_rewards.shape != response_mask.shape or token_level_rewards.dim() != 2:
        raise ValueError(f"token_level_rewards {tuple(token_level_rewards.shape)} and response_mask "
                         f"{tuple(response_mask.shape)} must be the same (bs, L) shape")
    r, turns = turn_rewards(token_level_rewards, response_mask)
    B, T = r.shape
    K = turns.num_turns
    k = torch.arange(T, device=r.device)[None]
    before_last = k < (K[:, None] - 1)
    hit = before_last & (r != 0)
    if bool((hit.sum(1) > 1).any()) or bool((hit & ((r - alpha).abs() > atol)).any()):
        bad = int(((hit.sum(1) > 1) | (hit & ((r - alpha).abs() > atol)).any(1)).nonzero()[0])
        raise ValueError(f"row {bad}: rewards on non-final turns must be a single FOLR alpha={alpha} "
                         f"(got per-turn rewards {r[bad, :int(K[bad])].tolist()}); build token_level_rewards "
                         "with folr_token_level_rewards")
    first = torch.where(hit.any(1), hit.long().argmax(1), torch.full_like(K, -1))
    outcome = r.gather(1, (K - 1).clamp(min=0)[:, None])[:, 0]
    groups = _group_ids(index, B, r.device)
    adv, _ = tk.turn_advantages(outcome.float(), first, K, groups, turns.turn_id, response_mask.bool(),
                                alpha=alpha, gamma=gamma, mode="tspo", norm=norm, eps=eps, max_turns=T)
    return adv, adv


def folr_token_level_rewards(outcome: torch.Tensor, first_turn: torch.Tensor, response_mask: torch.Tensor,
                             alpha: float = 0.5) -> torch.Tensor:
    """(bs, L) float32 token-level rewards carrying docs/algorithm.md §2's turn rewards.

    outcome (bs,) float R_i; first_turn (bs,) int k*_i (-1: none); response_mask (bs, L).
    alpha goes on the last policy token of turn k*, R_i on the last policy token of the row.
    """
    act = response_mask.bool()
    turns = turns_from_action_mask(act)
    nxt = torch.zeros_like(act)
    nxt[:, :-1] = act[:, 1:]
    run_end = act & ~nxt                                            # last token of each action run
    out = torch.zeros(act.shape, dtype=torch.float32, device=act.device)
    k_star = first_turn.long().to(act.device)[:, None]
    out += alpha * (run_end & (turns.turn_id == k_star) & (k_star >= 0)).float()
    last = run_end & (turns.turn_id == (turns.num_turns[:, None] - 1))
    out += outcome.float().to(act.device)[:, None] * last.float()
    return out


def folr_first_turn(response_ids: torch.Tensor, response_mask: torch.Tensor, aliases: Sequence[Sequence[str]],
                    tokenizer: Any, *, valid_mask: Optional[torch.Tensor] = None,
                    source: str = "observation") -> torch.Tensor:
    """FOLR's first-occurrence turn k* (bs,) int64 from response token ids (kernel K1).

    response_ids (bs, L) int; response_mask (bs, L): 1 on policy tokens; valid_mask (bs, L),
    optional: 1 on every real response token (veRL: ``attention_mask[:, -L:]``), so that an
    observation at the end of a truncated response is searched too.  aliases: per row, the gold
    answers (veRL: ``reward_model["ground_truth"]["target"]``).  tokenizer: the policy's.
    """
    turns = turns_from_action_mask(response_mask, valid_mask)
    k_star, _ = tk.first_occurrence_of_aliases(response_ids, turns.turn_id, turns.is_obs, aliases, tokenizer,
                                               source=source)
    return k_star


def _aliases(ground_truth: Any) -> list:
    """Gold aliases from a veRL ``reward_model["ground_truth"]`` (Search-R1: {"target": [...]})."""
    if isinstance(ground_truth, dict):
        ground_truth = ground_truth.get("target", ground_truth.get("answers"))
    if hasattr(ground_truth, "tolist"):
        ground_truth = ground_truth.tolist()
    if isinstance(ground_truth, str):
        return [ground_truth]
    if not isinstance(ground_truth, (list, tuple)):
        raise ValueError(f"cannot read gold aliases from ground_truth {ground_truth!r}")
    return [str(a) for a in ground_truth]


class TSPORewardManager:
    """veRL reward manager (veRL 0.9's ``AbstractRewardManager`` interface) writing docs/algorithm.md §2's
    turn rewards into ``token_level_rewards`` for :func:`compute_tspo_advantage`.

    Per row: R_i = ``compute_score(data_source=, solution_str=, ground_truth=, extra_info=)`` when
    given (a float, or a dict with "score"), else the EM (``outcome="em"``) / F1 of the last
    ``<answer>`` against the gold aliases; k*_i from the response token ids (K1, ``source``).
    Reads ``data.batch["responses"]`` (bs, L), ``["attention_mask"]`` (bs, prompt + L),
    ``["response_mask"]`` (bs, L; absent: every valid token is a policy token) and
    ``data.non_tensor_batch["reward_model"][i]["ground_truth"]``.
    """

    def __init__(self, tokenizer: Any, num_examine: int = 0, compute_score: Optional[Callable] = None,
                 reward_fn_key: str = "data_source", *, alpha: float = 0.5, source: str = "observation",
                 outcome: str = "em", **unused):
        self.tokenizer = tokenizer
        self.compute_score = compute_score
        self.reward_fn_key = reward_fn_key
        self.alpha = float(alpha)
        self.source = source
        self.outcome = outcome

    def __call__(self, data: Any, return_dict: bool = False):
        responses = data.batch["responses"]
        L = responses.shape[1]
        valid = data.batch["attention_mask"][:, -L:].bool()
        action = data.batch["response_mask"].bool() if "response_mask" in data.batch.keys() else valid
        nt = data.non_tensor_batch
        truths = [item["ground_truth"] for item in nt["reward_model"]]
        aliases = [_aliases(t) for t in truths]
        scores = []
        for i in range(responses.shape[0]):
            text = self.tokenizer.decode(responses[i][valid[i]].tolist(), skip_special_tokens=True)
            if self.compute_score is None:
                scores.append(outcome_reward(text, aliases[i], self.outcome))
                continue
            extra = nt["extra_info"][i] if "extra_info" in nt else {}
            score = self.compute_score(data_source=nt[self.reward_fn_key][i] if self.reward_fn_key in nt else None,
                                       solution_str=text, ground_truth=truths[i], extra_info=extra)
            scores.append(float(score["score"] if isinstance(score, dict) else score))
        outcome = torch.tensor(scores, dtype=torch.float32, device=responses.device)
        first = folr_first_turn(responses, action, aliases, self.tokenizer, valid_mask=valid, source=self.source)
        reward = folr_token_level_rewards(outcome, first, action, self.alpha)
        if not return_dict:
            return reward
        return {"reward_tensor": reward,
                "reward_extra_info": {"outcome": scores, "folr_first_turn": first.tolist()}}


def _response_masks(batch: Any, responses: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(action, valid) (..., L) bool masks of veRL response tensors (one row or a batch)."""
    L = responses.shape[-1]
    valid = batch["attention_mask"][..., -L:].bool()
    action = batch["response_mask"].bool() if "response_mask" in batch.keys() else valid
    return action, valid


def item_first_turn(item: Any, tokenizer: Any, source: str = "observation") -> int:
    """FOLR k* of one veRL ``DataProtoItem`` (``.batch`` row, ``.non_tensor_batch`` values)."""
    responses = item.batch["responses"]
    action, valid = _response_masks(item.batch, responses)
    aliases = _aliases(item.non_tensor_batch["reward_model"]["ground_truth"])
    return int(folr_first_turn(responses[None], action[None], [aliases], tokenizer, valid_mask=valid[None],
                               source=source)[0])


class FolrScore(float):
    """An outcome score R (a float, so veRL code that places scores itself still works) that
    also carries FOLR's first-occurrence turn ``first_turn`` (-1: none)."""

    def __new__(cls, value: float, first_turn: int = -1):
        obj = super().__new__(cls, value)
        obj.first_turn = int(first_turn)
        return obj

    def __reduce__(self):                       # pickles (Ray) with its turn
        return (FolrScore, (float(self), self.first_turn))


def folr_rm_scores(data: Any, scores: Sequence[Any], alpha: float = 0.5) -> torch.Tensor:
    """(bs, L) float32 token-level rewards from per-sample scores, for veRL's
    ``RewardManagerBase.assemble_rm_scores``: a :class:`FolrScore` (or an ``(R, k*)`` pair)
    gives R and k*; a plain float is R with no FOLR hit."""
    responses = data.batch["responses"]
    action, _ = _response_masks(data.batch, responses)
    pairs = [tuple(s) if isinstance(s, (tuple, list)) else (s, getattr(s, "first_turn", -1)) for s in scores]
    if len(pairs) != responses.shape[0]:
        raise ValueError(f"{len(pairs)} scores for {responses.shape[0]} responses")
    outcome = torch.tensor([float(r) for r, _ in pairs], dtype=torch.float32, device=responses.device)
    first = torch.tensor([int(k) for _, k in pairs], dtype=torch.long, device=responses.device)
    return folr_token_level_rewards(outcome, first, action, alpha)


def _reward_loop_manager_class():
    """veRL >= 0.9 reward loop: a subclass of its "naive" manager whose per-sample score is a
    :class:`FolrScore` (R from ``compute_score`` as usual, plus k*) and which assembles the FOLR
    token-level rewards.  Where veRL places a score by itself (reward computed inside the agent
    loop) the score is still the float R: training proceeds as TSPO without FOLR hits."""
    from verl.experimental.reward_loop.reward_manager import register
    from verl.experimental.reward_loop.reward_manager.naive import NaiveRewardManager

    class TSPORewardLoopManager(NaiveRewardManager):
        folr_alpha = 0.5
        folr_source = "observation"

        async def run_single(self, data):
            out = await super().run_single(data)
            k_star = item_first_turn(data[-1:][0], self.tokenizer, self.folr_source)
            score = out["reward_score"]
            out["reward_score"] = FolrScore(float(score), k_star)
            out.setdefault("reward_extra_info", {})["folr_first_turn"] = k_star
            return out

        @classmethod
        def assemble_rm_scores(cls, data, scores):
            return folr_rm_scores(data, scores, cls.folr_alpha)

    # a module-level name, so that plain pickle (and Ray) find the class by reference
    TSPORewardLoopManager.__qualname__ = "TSPORewardLoopManager"
    try:
        return register("tspo")(TSPORewardLoopManager)
    except ValueError:  # already registered (this module was imported twice)
        from verl.experimental.reward_loop.reward_manager import get_reward_manager_cls
        return get_reward_manager_cls("tspo")


def make_tspo_estimator(**options) -> Callable:
    """An estimator with fixed options (alpha, gamma, norm, eps) and veRL's calling convention."""
    def estimator(token_level_rewards, response_mask, index=None, config=None, **kwargs):
        if index is None:
            raise ValueError("the TSPO estimator needs the prompt uids (veRL passes non_tensor_batch['uid'] as index)")
        return compute_tspo_advantage(token_level_rewards, response_mask, index, config, **options)

    estimator.__name__ = "compute_tspo_advantage"
    estimator.__doc__ = compute_tspo_advantage.__doc__
    return estimator


def register_tspo_estimator(name: str = "tspo", **options) -> Callable:
    """Register a TSPO estimator with veRL under ``name`` (``algorithm.adv_estimator=<name>``)."""
    try:
        from verl.trainer.ppo.core_algos import register_adv_est
    except ImportError as exc:
        raise ImportError("register_tspo_estimator needs veRL (pip install verl)") from exc
    return register_adv_est(name)(make_tspo_estimator(**options))


def _register_with_verl() -> None:
    """Where veRL is importable: the "tspo" advantage estimator and the "tspo" reward manager."""
    try:
        import verl.trainer.ppo.core_algos as core_algos
    except Exception:  # veRL absent (or broken): the functions above still work
        return
    if "tspo" not in getattr(core_algos, "ADV_ESTIMATOR_REGISTRY", {}):
        register_tspo_estimator("tspo")
    global TSPORewardLoopManager
    try:
        TSPORewardLoopManager = _reward_loop_manager_class()
    except ImportError:  # veRL without the reward loop
        pass
    try:
        from verl.workers.reward_manager import registry
    except Exception:  # older / newer layouts: register TSPORewardManager yourself
        return
    if "tspo" not in getattr(registry, "REWARD_MANAGER_REGISTRY", {}):
        registry.register("tspo")(TSPORewardManager)


TSPORewardLoopManager = None   # set to the registered class where veRL's reward loop is importable
_register_with_verl()
