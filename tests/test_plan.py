"""The memory plan (tspo_fast/training/plan.py, ``tspo-fast plan``): the arithmetic on the shipped
3b/7b configs at world sizes 1 and 8, what vLLM keeps through sleep, the free memory (not the card)
as the limit, the trainer's check reading its own GPU, and a config that cannot fit fails naming
the fields."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tspo_fast.config import ConfigError, load_config
from tspo_fast.training.plan import GIB, KNOWN_SHAPES, VLLM_SLEEP_RESIDUE_GIB, model_shape, plan_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
H100 = 79.6


def test_parameter_counts_are_the_published_ones():
    assert KNOWN_SHAPES["Qwen/Qwen2.5-7B"].params == 7_615_616_512
    assert KNOWN_SHAPES["Qwen/Qwen2.5-3B"].params == 3_085_938_688
    assert KNOWN_SHAPES["Qwen/Qwen2.5-0.5B"].params == 494_032_768


@pytest.mark.parametrize("name,gpus", [("7b", 1), ("7b", 8), ("3b", 1), ("3b", 8)])
def test_plan_arithmetic(name, gpus):
    cfg = load_config(os.path.join(ROOT, "configs", f"{name}.yaml"))
    shape = model_shape(cfg.model.path)
    P = shape.params
    p = plan_memory(cfg, gpus, H100)
    terms = {n: g for n, g, _ in p.lines}
    # DeepSpeed's ZeRO-3 estimate: 18 bytes/param over the ranks + the largest layer in fp32
    assert terms["ZeRO-3 model states"] == pytest.approx((18 * P / gpus + 4 * shape.largest_layer) / GIB, rel=1e-6)
    assert terms["reference model"] == pytest.approx(2 * P / gpus / GIB)                    # bf16, partitioned
    assert terms["vLLM (rollout)"] == pytest.approx(cfg.rollout.gpu_memory_utilization * H100)
    per_tok = shape.layers * shape.hidden * 2 + (10 * shape.hidden + 4 * shape.intermediate) * 2
    assert terms["activations (update)"] == pytest.approx(cfg.train.max_tokens_per_micro * per_tok / GIB)
    # vLLM asleep keeps its CUDA-graph pool and runner buffers (graphs: enforce_eager is null, GPU)
    assert terms["vLLM kept asleep (update)"] == pytest.approx(sum(VLLM_SLEEP_RESIDUE_GIB.values())) == 2.5
    resident = terms["ZeRO-3 model states"] + terms["reference model"] + terms["margin"]
    assert p.rollout_gib == pytest.approx(resident + terms["vLLM (rollout)"])
    assert p.update_gib == pytest.approx(resident + terms["activations (update)"] + terms["K3 chunk + weight grad"]
                                         + terms["vLLM kept asleep (update)"])
    assert p.fits == (gpus == 8)          # one 80 GB card holds neither model's full training state


def test_cli_names_the_fields_to_change():
    env = dict(os.environ, PYTHONPATH=ROOT)
    bad = subprocess.run([sys.executable, "-m", "tspo_fast.cli", "plan", "--config", "configs/7b.yaml", "--gpus", "1",
                          "--gpu-memory-gib", str(H100)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1
    assert "does NOT fit" in bad.stdout and "world size: 8 GPUs" in bad.stdout and "train.offload_param" in bad.stdout
    good = subprocess.run([sys.executable, "-m", "tspo_fast.cli", "plan", "--config", "configs/7b.yaml", "--gpus", "8",
                           "--gpu-memory-gib", str(H100)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert good.returncode == 0 and good.stdout.strip().endswith("fits")


def test_offload_and_smaller_vllm_fraction_show_in_the_plan():
    cfg = load_config(os.path.join(ROOT, "configs", "3b.yaml"), ["train.offload_optimizer=true"])
    p = plan_memory(cfg, 1, H100)
    assert p.fits and dict((n, g) for n, g, _ in p.lines)["ZeRO-3 model states"] < 10
    cfg = load_config(os.path.join(ROOT, "configs", "3b.yaml"), ["rollout.gpu_memory_utilization=0.15"])
    assert plan_memory(cfg, 1, H100).rollout_gib < plan_memory(load_config(os.path.join(ROOT, "configs", "3b.yaml")),
                                                               1, H100).rollout_gib
    with pytest.raises(ValueError, match="model.path: cannot read the shape"):
        plan_memory(load_config(None, ["model.path=nobody/unknown-model"]), 1, H100)


def _terms(p):
    return {n: g for n, g, _ in p.lines}


def test_vllm_sleep_residue_term():
    """What vLLM keeps through sleep counts in the update: no graph pool when eager, the whole
    fraction without sleep mode, a measured figure when given."""
    cfg = load_config(os.path.join(ROOT, "configs", "7b.yaml"))
    base = plan_memory(cfg, 8, H100)
    eager = plan_memory(load_config(os.path.join(ROOT, "configs", "7b.yaml"), ["rollout.enforce_eager=true"]), 8, H100)
    assert _terms(eager)["vLLM kept asleep (update)"] == pytest.approx(VLLM_SLEEP_RESIDUE_GIB["runner"])
    assert base.update_gib - eager.update_gib == pytest.approx(VLLM_SLEEP_RESIDUE_GIB["cuda_graphs"])
    measured = plan_memory(cfg, 8, H100, sleep_residue_gib=4.0)
    assert measured.update_gib - base.update_gib == pytest.approx(4.0 - 2.5)
    awake = plan_memory(cfg, 8, H100, sleep=False)
    assert _terms(awake)["vLLM kept asleep (update)"] == 0.0
    assert awake.update_gib - base.update_gib == pytest.approx(0.6 * H100 - 2.5)
    hf = plan_memory(load_config(os.path.join(ROOT, "configs", "7b.yaml"), ["rollout.engine=hf"]), 8, H100)
    assert _terms(hf)["vLLM kept asleep (update)"] == 0.0 and _terms(hf)["vLLM (rollout)"] == 0.0
    with pytest.raises(ValueError, match="sleep residue must be >= 0"):
        plan_memory(cfg, 8, H100, sleep_residue_gib=-1)


def test_free_memory_not_the_card_is_the_limit():
    """vLLM's fraction is of the card's total, but the peaks must fit what is free: 7b on 8 H100s
    fits an empty card and not one where another process holds memory."""
    cfg = load_config(os.path.join(ROOT, "configs", "7b.yaml"))
    empty = plan_memory(cfg, 8, H100)
    assert empty.fits
    peak = max(empty.rollout_gib, empty.update_gib)
    busy = plan_memory(cfg, 8, H100, free_gib=peak - 1.0)
    assert _terms(busy) == _terms(empty)                     # the same terms (vLLM: 0.6 of the card)
    assert not busy.fits and f"{peak - 1.0:.1f} GiB free on this rank's GPU" in busy.table()
    assert "rollout.gpu_memory_utilization: at most" in busy.table()
    assert plan_memory(cfg, 8, H100, free_gib=peak + 0.01).fits
    with pytest.raises(ValueError, match="free memory must be > 0 and at most the card"):
        plan_memory(cfg, 8, H100, free_gib=H100 + 5)


def test_preflight_reads_the_free_memory_of_the_ranks_own_gpu(monkeypatch):
    """The trainer's check asks torch.cuda.mem_get_info for cuda:LOCAL_RANK and compares the plan
    with what is free there.  No GPU here: torch.cuda's device queries are stand-ins that report
    8 GPUs of 79.6 GiB (the arithmetic and the device choice are what is tested)."""
    from tspo_fast.training import trainer

    asked = []
    free = {"gib": H100}

    def mem_get_info(device=None):
        asked.append(torch.device(device))
        return int(free["gib"] * GIB), int(H100 * GIB)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    monkeypatch.setenv("LOCAL_RANK", "3")
    cfg = load_config(os.path.join(ROOT, "configs", "7b.yaml"))
    trainer.preflight(cfg, 8)                                    # an empty card: fits
    assert asked == [torch.device("cuda", 3)]
    free["gib"] = 20.0                                           # another process holds the rest
    with pytest.raises(ConfigError, match=r"does not fit the memory free on cuda:3[\s\S]*20\.0 GiB free"):
        trainer.preflight(cfg, 8)
    assert asked[-1] == torch.device("cuda", 3)
    monkeypatch.setenv("LOCAL_RANK", "9")
    with pytest.raises(RuntimeError, match="LOCAL_RANK=9 but this process sees 8 GPU"):
        trainer.preflight(cfg, 8)


def test_kept_frozen_layer_outputs_are_counted_and_can_be_given_back():
    """LoRA on the top layers keeps the frozen layers' output of the step's tokens: hidden x dtype
    bytes a token at most, in the update's peak; ``share_frozen: false`` gives it back (and is
    advised when the update does not fit)."""
    lora = ["model.lora.rank=16", "model.lora.top_layers=8"]
    cfg = load_config(os.path.join(ROOT, "configs", "7b.yaml"), lora)
    shape = model_shape(cfg.model.path)
    kept = _terms(plan_memory(cfg, 8, H100))["frozen layers' output (update)"]
    tokens = cfg.train.prompts_per_step * cfg.rollout.n / 8 * (cfg.data.max_prompt_tokens + cfg.rollout.max_response_tokens)
    assert kept == pytest.approx(tokens * shape.hidden * 2 / GIB)                   # bf16
    off = load_config(os.path.join(ROOT, "configs", "7b.yaml"), lora + ["model.lora.share_frozen=false"])
    assert "frozen layers' output (update)" not in _terms(plan_memory(off, 8, H100))
    assert plan_memory(cfg, 8, H100).update_gib - plan_memory(off, 8, H100).update_gib == pytest.approx(kept)
    tight = plan_memory(cfg, 8, 40.0)
    assert not tight.fits and any("model.lora.share_frozen: false" in a for a in tight.advice)
