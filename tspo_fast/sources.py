"""From config names to the things a run uses: QA examples, prompts, the retriever.

``bundled:train`` / ``bundled:test`` are the embedded world's question sets and
``bundled:bm25`` a BM25 index over its corpus (built once into the cache folder).
"""
from __future__ import annotations

import os
from typing import Any, List, Sequence

from .config import RetrievalConfig
from .data import QAExample, build_prompt, load_examples
from .models import cache_dir


def resolve_data_file(name: str) -> str:
    if name.startswith("bundled:"):
        from .world import qa_path
        split = name.split(":", 1)[1]
        try:
            return str(qa_path(split))
        except ValueError:
            raise ValueError(f"data: unknown bundled set {name!r}; use bundled:train or bundled:test") from None
    if not os.path.exists(name):
        raise FileNotFoundError(f"data file not found: {name}")
    return name


def load_split(files: Sequence[str]) -> List[QAExample]:
    """Examples of every file in order (uids must be unique across files)."""
    out: List[QAExample] = []
    for f in files:
        out += load_examples(resolve_data_file(f))
    return out


def prompt_items(examples: Sequence[QAExample], tokenizer: Any, chat_template: str = "auto"):
    """Rollout inputs: prompt token ids (chat template applied when the tokenizer has one)."""
    from .rollout.agent import PromptItem
    tok = tokenizer if chat_template == "auto" else None
    items = []
    for ex in examples:
        text = build_prompt(ex.question, tok)
        ids = tokenizer.encode(text, add_special_tokens=False)
        items.append(PromptItem(prompt_ids=ids, uid=ex.uid, aliases=list(ex.aliases), data_source=ex.data_source))
    return items


def bundled_index(kind: str = "bm25") -> str:
    """The embedded world's index folder, built on first use."""
    from .retrieval import build_index
    from .world import corpus_path
    import hashlib
    digest = hashlib.sha256(corpus_path().read_bytes()).hexdigest()[:12]   # a regenerated world gets a new index
    folder = os.path.join(cache_dir(), f"world-{kind}-{digest}")
    if not os.path.exists(os.path.join(folder, "meta.json")):
        tmp = folder + f".tmp{os.getpid()}"
        build_index(corpus_path(), kind, tmp, copy_corpus=True, progress=False)
        try:
            os.replace(tmp, folder)
        except OSError:
            import shutil
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def build_retriever(cfg: RetrievalConfig):
    """The retriever the rollout calls: in-process over an index folder, or HTTP."""
    from .retrieval import HTTPRetriever, HTTPRetrieverConfig, InProcessRetriever
    if cfg.kind == "http":
        return HTTPRetriever(config=HTTPRetrieverConfig(url=cfg.url, timeout_s=cfg.timeout_s, retries=cfg.retries))
    index = cfg.index
    if index.startswith("bundled:"):
        index = bundled_index(index.split(":", 1)[1])
    elif not os.path.isdir(index):
        raise FileNotFoundError(f"retrieval.index: no index folder at {index}")
    return InProcessRetriever.from_dir(index)


def build_engine(cfg, model_path: str, *, rank: int = 0, world: int = 1):
    """The rollout engine of ``cfg.rollout.engine`` for ``model_path`` (vLLM sized by the config)."""
    from .rollout.engines import make_engine
    r = cfg.rollout
    kwargs = {}
    if r.engine == "vllm":
        kwargs = dict(max_model_len=cfg.data.max_prompt_tokens + r.max_response_tokens,
                      tensor_parallel_size=r.tensor_parallel_size, gpu_memory_utilization=r.gpu_memory_utilization,
                      dtype=cfg.model.dtype, seed=cfg.seed * 1000 + rank)
        if world > 1:
            kwargs["distributed_executor_backend"] = "external_launcher"
    return make_engine(r.engine, model_path, **kwargs)


def agent_config(cfg, **overrides):
    """The rollout agent's settings from a training config (``overrides`` win)."""
    from .rollout.agent import RolloutConfig as AgentConfig
    r = cfg.rollout
    fields = dict(n=r.n, max_turns=r.max_turns, topk=cfg.retrieval.topk, max_new_tokens_per_turn=r.max_new_tokens_per_turn,
                  max_obs_tokens=r.max_obs_tokens, max_prompt_tokens=cfg.data.max_prompt_tokens,
                  max_response_tokens=r.max_response_tokens, temperature=r.temperature, top_p=r.top_p, seed=cfg.seed,
                  retrieval_retries=cfg.retrieval.retries, retrieval_timeout_s=cfg.retrieval.timeout_s)
    fields.update(overrides)
    return AgentConfig(**fields)
