"""The memory plan (tspo_fast/training/plan.py, ``tspo-fast plan``): the arithmetic on the shipped
3b/7b configs at world sizes 1 and 8, and a config that cannot fit fails naming the fields."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tspo_fast.config import load_config
from tspo_fast.training.plan import GIB, KNOWN_SHAPES, model_shape, plan_memory

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
    resident = terms["ZeRO-3 model states"] + terms["reference model"] + terms["margin"]
    assert p.rollout_gib == pytest.approx(resident + terms["vLLM (rollout)"])
    assert p.update_gib == pytest.approx(resident + terms["activations (update)"] + terms["K3 chunk + weight grad"])
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
