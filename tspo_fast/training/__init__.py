"""Training: the trainer (orchestration), the PPO update under DeepSpeed, the fused-head policy,
distributed helpers, checkpoints, metrics and the end-of-run report, evaluation and the builders
from a config."""
from .builders import build_actor, build_agent, build_reference, build_rollout, load_data
from .checkpoint import export_hf, latest_checkpoint, load_checkpoint, save_checkpoint
from .evaluate import evaluate, format_table, write_result
from .metrics import MetricsLogger, read_metrics, step_metrics
from .policy import FusedHeadPolicy
from .ppo import UpdateStats, compute_logprobs, ppo_update, token_weights_normalizer
from .report import run_report
from .trainer import Trainer

__all__ = ["build_actor", "build_agent", "build_reference", "build_rollout", "load_data", "export_hf",
           "latest_checkpoint", "load_checkpoint", "save_checkpoint", "evaluate", "format_table", "write_result",
           "MetricsLogger", "read_metrics", "step_metrics", "FusedHeadPolicy", "UpdateStats", "compute_logprobs",
           "ppo_update", "token_weights_normalizer", "run_report", "Trainer"]
