"""Hugging Face ``generate`` as a rollout engine (CPU default for tiny models, reference engine).

Prompts are left-padded into one batch; log-probs come from ``output_logits`` (raw logits,
``log_softmax`` in float32); stop strings are detected on the decoded tail of each row by a
``StoppingCriteria`` and the ids are cut right after the token that completes the stop string.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
from transformers import AutoModelForCausalLM, StoppingCriteria, StoppingCriteriaList

from ..models import load_tokenizer
from .base import (
    FINISH_EOS,
    FINISH_LENGTH,
    FINISH_STOP,
    EngineSettings,
    Generation,
    SamplingConfig,
    find_stop,
    mix_seed,
)


class _StopStrings(StoppingCriteria):
    """Per-row ``StoppingCriteria``: true once the generated tail contains a stop string."""

    def __init__(self, tokenizer, stops: Sequence[str], prompt_width: int):
        self.tokenizer = tokenizer
        self.stops = list(stops)
        self.prompt_width = prompt_width
        # Every token of an ASCII stop string adds at least one character, so a window of
        # len(longest stop) + 1 tokens sees any stop string completed by the newest token.
        self.window = max(len(s) for s in self.stops) + 1

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        gen = input_ids[:, self.prompt_width:]
        tails = self.tokenizer.batch_decode(gen[:, -self.window:].tolist(), skip_special_tokens=False)
        return torch.tensor([any(s in t for s in self.stops) for t in tails],
                            dtype=torch.bool, device=input_ids.device)


class HFEngine:
    """A ``transformers`` causal LM + tokenizer behind the engine interface.

    ``batch_size`` bounds how many prompts go into one ``generate`` call.
    """

    supports_sleep = False
    supports_streaming = False      # the agent runs its turn-synchronous loop with this engine

    def __init__(self, model, tokenizer, batch_size: int = 64, max_model_len: int | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_model_len = max_model_len or int(model.config.max_position_embeddings)
        eos = model.generation_config.eos_token_id
        if eos is None:
            eos = tokenizer.eos_token_id
        self.eos_ids: list[int] = list(eos) if isinstance(eos, (list, tuple)) else [int(eos)]
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[0]

    @classmethod
    def from_pretrained(cls, model_path: str, dtype: str = "float32", device: str = "cpu",
                        **kwargs) -> "HFEngine":
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype)).to(device)
        return cls(model, load_tokenizer(model_path), **kwargs)

    # ------------------------------------------------------------------ generation
    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @torch.no_grad()
    def generate(self, prompts_token_ids: Sequence[Sequence[int]], sampling: SamplingConfig,
                 keys=None) -> list[Generation]:
        """One ``generate`` per ``batch_size`` prompts; with ``sampling.seed`` each of those
        batches samples from ``mix_seed(seed, first index)`` (one generator per batch: ``keys``
        cannot give requests their own streams here)."""
        out: list[Generation] = []
        for start in range(0, len(prompts_token_ids), self.batch_size):
            chunk = prompts_token_ids[start:start + self.batch_size]
            seed = None if sampling.seed is None else mix_seed(sampling.seed, start)
            out.extend(self._generate_batch(chunk, sampling, seed))
        return out

    def _generate_batch(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig,
                        seed: int | None) -> list[Generation]:
        device = self.model.device
        width = max(len(p) for p in prompts)
        rooms = [self.max_model_len - len(p) for p in prompts]  # like vLLM: stop at the context
        if min(rooms) < 1:
            raise ValueError(f"a prompt of {width} tokens leaves no room in the context of "
                             f"{self.max_model_len} tokens")
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise ValueError(f"prompt {i} is empty")
            ids[i, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
            mask[i, width - len(p):] = 1
        stop_ids = self.eos_ids + [t for t in sampling.stop_token_ids if t not in self.eos_ids]
        kwargs = dict(
            max_new_tokens=min(sampling.max_new_tokens, max(rooms)), eos_token_id=stop_ids, pad_token_id=self.pad_id,
            output_logits=True, return_dict_in_generate=True,
        )
        if sampling.temperature == 0:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
        if sampling.stop:
            kwargs["stopping_criteria"] = StoppingCriteriaList([_StopStrings(self.tokenizer, sampling.stop, width)])
        if seed is not None:
            torch.manual_seed(seed)
        res = self.model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
        gen = res.sequences[:, width:].cpu()
        # (steps, B, V) raw logits -> log-prob of the sampled token, (B, steps)
        logits = torch.stack(res.logits, dim=1).float().cpu()
        logp = torch.log_softmax(logits, dim=-1).gather(-1, gen.unsqueeze(-1)).squeeze(-1)
        return [self._finish(gen[i, :rooms[i]].tolist(), logp[i, :rooms[i]].tolist(), sampling, stop_ids)
                for i in range(len(prompts))]

    def _finish(self, ids: list[int], logps: list[float], sampling: SamplingConfig,
                stop_ids: list[int]) -> Generation:
        """Cut a padded row after its EOS / stop-string token; build the ``Generation``."""
        window = max((len(s) for s in sampling.stop), default=0) + 1
        for t, tok in enumerate(ids):
            if tok in stop_ids:
                keep = ids[:t + 1]
                return Generation(keep, logps[:t + 1], self._decode(keep), FINISH_EOS)
            if sampling.stop:
                tail = self.tokenizer.decode(ids[max(0, t + 1 - window):t + 1], skip_special_tokens=False)
                if any(s in tail for s in sampling.stop):
                    keep = ids[:t + 1]
                    text = self._decode(keep)
                    hit = find_stop(text, sampling.stop)
                    if hit is not None:
                        return Generation(keep, logps[:t + 1], text[:hit[0]], FINISH_STOP, hit[1])
        return Generation(ids, logps, self._decode(ids), FINISH_LENGTH)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    # ------------------------------------------------------------------ weights
    @torch.no_grad()
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy tensors into the model's parameters by their Hugging Face names; returns the names."""
        params = dict(self.model.named_parameters())
        loaded = set()
        for name, tensor in named_tensors:
            if name not in params:
                raise KeyError(f"HFEngine.load_weights: model has no parameter {name!r}")
            params[name].copy_(tensor.to(params[name].device, params[name].dtype))
            loaded.add(name)
        return loaded

    def weight_names(self) -> set[str]:
        return {n for n, _ in self.model.named_parameters()}

    def reset_prefix_cache(self) -> bool:
        """No cache survives a ``generate`` call: nothing to reset."""
        return True

    def sleep(self, level: int = 2) -> None:
        """Not supported: no-op."""

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Not supported: no-op."""


def from_config(settings: EngineSettings) -> HFEngine:
    """``rollout.engine: hf``: the model in ``rollout.dtype`` (null: ``model.dtype``) on this rank's device."""
    device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    return HFEngine.from_pretrained(settings.model_path, dtype=settings.dtype, device=device,
                                    max_model_len=settings.max_model_len)
