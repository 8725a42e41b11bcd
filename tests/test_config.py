"""Config: YAML + overrides into typed dataclasses; bad input names the field."""
import glob
import os

import pytest

from tspo_fast.config import Config, ConfigError, load_config, parse_override

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml"))))
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    if "grpo" in os.path.basename(path):
        assert cfg.advantage.mode == "grpo"


def test_search_r1_settings_in_7b():
    cfg = load_config(os.path.join(ROOT, "configs", "7b.yaml"))
    assert (cfg.train.prompts_per_step, cfg.rollout.n, cfg.train.lr, cfg.loss.kl_coef) == (512, 5, 1e-6, 1e-3)
    assert (cfg.loss.eps_low, cfg.loss.eps_high, cfg.rollout.max_turns, cfg.retrieval.topk) == (0.2, 0.2, 4, 3)
    assert cfg.train.zero_stage == 3 and cfg.retrieval.kind == "http"


def test_overrides_are_typed():
    cfg = load_config(os.path.join(ROOT, "configs", "tiny.yaml"),
                      ["advantage.mode=grpo", "loss.dual_clip=3", "rollout.n=2", "loss.tis_cap=null",
                       "data.train_files=[a.jsonl, b.jsonl]"])
    assert cfg.advantage.mode == "grpo" and cfg.loss.dual_clip == 3.0 and cfg.rollout.n == 2
    assert cfg.loss.tis_cap is None and cfg.data.train_files == ["a.jsonl", "b.jsonl"]
    assert parse_override("a.b= 0.5") == ("a.b", 0.5)
    # YAML 1.1 reads 1e-3 (no dot) as a string; a float field still takes it
    assert load_config(os.path.join(ROOT, "configs", "tiny.yaml"), ["train.lr=1e-3"]).train.lr == 0.001


@pytest.mark.parametrize("override,field", [
    ("rollout.n=0", "rollout.n"),
    ("advantage.mode=ppo", "advantage.mode"),
    ("advantage.norm=batch", "advantage.norm"),
    ("advantage.gamma=1.5", "advantage.gamma"),
    ("reward.folr_source=prompt", "reward.folr_source"),
    ("loss.agg=sum", "loss.agg"),
    ("train.lr=fast", "train.lr"),
    ("train.total_steps=2.5", "train.total_steps"),
    ("rollout.engine=sglang", "rollout.engine"),
    ("train.mini_batch_prompts=3", "train.mini_batch_prompts"),
    ("model.dtype=int8", "model.dtype"),
    ("loss.dual_clip=0.5", "loss.dual_clip"),
    ("rollout.nn=3", "rollout.nn"),
    ("optimizer.lr=3", "optimizer"),
    ("train.bf16=maybe", "train.bf16"),
])
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ConfigError) as e:
        load_config(os.path.join(ROOT, "configs", "tiny.yaml"), [override])
    assert str(e.value).startswith(field), str(e.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("rollout: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(str(bad))
    bad.write_text("rollout: 3\n")
    with pytest.raises(ConfigError, match="^rollout: expected a mapping"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["advantage.mode"])
