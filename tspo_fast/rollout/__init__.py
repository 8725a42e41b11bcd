"""Rollout: the multi-turn search agent loop, the engines it drives, and weight sync.

Heavy dependencies (vLLM, DeepSpeed, transformers) are imported only by the modules that use
them; importing this package is cheap.
"""
from .agent import (INVALID_ACTION_OBS, PromptItem, RetrievalError, RolloutConfig, SearchAgent,
                    format_docs, parse_action, search_observation)
from .batch import RolloutBatch, Trajectory, collate, group_id_of
from .engines import Engine, Generation, SamplingConfig, make_engine
from .sync import SyncStats, sync_weights

__all__ = [
    "INVALID_ACTION_OBS", "PromptItem", "RetrievalError", "RolloutConfig", "SearchAgent",
    "format_docs", "parse_action", "search_observation", "RolloutBatch", "Trajectory", "collate",
    "group_id_of", "Engine", "Generation", "SamplingConfig", "make_engine", "SyncStats",
    "sync_weights",
]
