"""Rollout engines: the interface and registry (``base``), Hugging Face ``generate`` (``hf``),
in-process vLLM (``vllm``, with its version patches in ``vllm_patches``), and the weight sync
from the trainer into an engine (``sync``).

Importing this package loads only the interface; each engine module imports its own
dependencies (vLLM is an optional extra).
"""
from .base import (
    ENGINES,
    FINISH_EOS,
    FINISH_LENGTH,
    FINISH_STOP,
    Engine,
    EngineSettings,
    Generation,
    SamplingConfig,
    build_engine,
    find_stop,
)

__all__ = ["ENGINES", "FINISH_EOS", "FINISH_LENGTH", "FINISH_STOP", "Engine", "EngineSettings", "Generation", "SamplingConfig",
           "build_engine", "find_stop"]
