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
    with pytest.raises(ConfigError, match=f"^{bad}: rollout: expected a mapping"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["advantage.mode"])


@pytest.mark.parametrize("override,field,allowed", [
    ("data.eval_limit=-290", "data.eval_limit", ">= 0"),
    ("rollout.temperature=inf", "rollout.temperature", "finite"),
    ("reward.folr_alpha=.inf", "reward.folr_alpha", "finite"),
    ("train.lr=inf", "train.lr", "finite"),
    ("train.lr=nan", "train.lr", "finite"),
    ("loss.kl_clamp=-1", "loss.kl_clamp", "> 0"),
    ("train.warmup_steps=-3", "train.warmup_steps", ">= 0"),
    ("train.keep_checkpoints=-1", "train.keep_checkpoints", ">= 0"),
    ("rollout.gpu_memory_utilization=7", "rollout.gpu_memory_utilization", "(0, 1]"),
    ("rollout.max_num_seqs=0", "rollout.max_num_seqs", ">= 1 or null"),
    ("rollout.cpu_gemm=onednn", "rollout.cpu_gemm", "'packed', 'linear'"),
    ("seed=-1", "seed", "[0, 2**31)"),
    ("seed=4294967296", "seed", "[0, 2**31)"),
    ("output_dir=' '", "output_dir", "must name a folder"),
    ("model.dtype=float16", "model.dtype", "no fp16 loss scaler"),
    ("train.max_skipped_steps=0", "train.max_skipped_steps", ">= 1"),
    ("data.overlong_prompts=truncate", "data.overlong_prompts", "'skip', 'error'"),
    ("data.train_files=[bundled:train, bundled:train]", "data.train_files[1]", "same file"),
    ("data.test_files=[a.jsonl, ./a.jsonl]", "data.test_files[1]", "same file"),
    ("data.train_files=['']", "data.train_files[0]", "must name a file"),
])
def test_values_the_issue_found_accepted_are_rejected(override, field, allowed):
    with pytest.raises(ConfigError) as e:
        load_config(os.path.join(ROOT, "configs", "tiny.yaml"), [override])
    assert str(e.value).startswith(field + ":") and allowed in str(e.value), str(e.value)


def test_resume_compares_the_config_with_the_checkpoints():
    from tspo_fast.training.checkpoint import resume_changes

    tiny = os.path.join(ROOT, "configs", "tiny.yaml")
    saved = {"step": 4, "world_size": 1, "config": load_config(tiny).to_dict()}
    assert resume_changes(saved, load_config(tiny), world=1) == []
    applied = resume_changes(saved, load_config(tiny, ["train.lr=1e-3", "seed=5", "rollout.temperature=0.7",
                                                       "train.total_steps=99"]), world=1)
    assert "train.lr: 0.0003 -> 0.001 (applied to the restored optimizer and schedule)" in applied
    assert any(a.startswith("seed: 1 -> 5 (applied: the questions of the next steps differ") for a in applied)
    assert any(a.startswith("rollout.temperature: 1.0 -> 0.7 (applied") for a in applied) and len(applied) == 4
    with pytest.raises(ConfigError) as e:
        resume_changes(saved, load_config(tiny, ["model.path=bundled:tiny", "model.lora.rank=8", "train.lr=1"]), world=1)
    msg = str(e.value)
    assert "model.path: 'bundled:warmstart' -> 'bundled:tiny' cannot apply" in msg
    assert "model.lora.rank: 0 -> 8 cannot apply" in msg and "train.lr" not in msg
    with pytest.raises(ConfigError, match="train.warmup_steps: 0 -> 10 cannot apply"):
        resume_changes(saved, load_config(tiny, ["train.warmup_steps=10"]), world=1)
    with pytest.raises(ConfigError, match="written by 1 rank"):
        resume_changes(saved, load_config(tiny), world=2)
    assert "records no config" in resume_changes({"step": 4}, load_config(tiny), world=1)[0]


def test_resume_rules_are_declared_beside_their_fields():
    """Each field's rule on resume is its dataclass field's metadata (tspo_fast/config.py), read by
    resume_changes; a rule on a section (model.lora) covers every field under it."""
    from tspo_fast.config import OnResume, resume_rules
    from tspo_fast.training.checkpoint import resume_changes

    rules = resume_rules()
    by_kind = {}
    for key, rule in rules.items():
        by_kind.setdefault(rule.applies, set()).add(key)
    assert by_kind["never"] == {"model.path", "model.gguf_file", "model.dtype", "model.lora", "train.zero_stage",
                                "train.bf16", "train.offload_optimizer", "train.offload_param"}
    assert by_kind["optimizer"] == {"train.lr", "train.weight_decay", "train.warmup_steps"}
    assert by_kind["data order"] == {"seed", "train.prompts_per_step", "data.shuffle", "data.train_files"}
    assert by_kind["ignored"] == {"output_dir"}
    assert all(rules[k].why for k in by_kind["never"])
    tiny = os.path.join(ROOT, "configs", "tiny.yaml")
    saved = {"step": 4, "world_size": 1, "config": load_config(tiny).to_dict()}
    with pytest.raises(ConfigError, match=r"model.lora.target_modules: .* cannot apply to this checkpoint \(the "
                                          r"checkpoint holds the parameters of that adapter layout\)"):
        resume_changes(saved, load_config(tiny, ["model.lora.target_modules=[q_proj]"]), world=1)
    assert resume_changes(saved, load_config(tiny, ["output_dir=/elsewhere/run"]), world=1) == []
    with pytest.raises(ValueError, match="OnResume.applies"):
        OnResume("sometimes")
    with pytest.raises(ValueError, match="OnResume.why"):
        OnResume("never")


@pytest.mark.slow
def test_cli_errors_are_one_line_and_debug_shows_the_traceback(tmp_path):
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "tspo_fast.cli", "train", "--config", os.path.join(ROOT, "configs", "tiny.yaml"),
           "--set", "rollout.n=0", "--set", f"output_dir={tmp_path}"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 1 and p.stderr.strip() == "tspo-fast train: error: rollout.n: must be >= 1, got 0", p.stderr
    p = subprocess.run(cmd + ["--debug"], capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 1 and "Traceback" in p.stderr and p.stderr.strip().endswith("rollout.n: must be >= 1, got 0")
    p = subprocess.run([sys.executable, "-m", "tspo_fast.cli", "eval", "--config", os.path.join(ROOT, "configs", "tiny.yaml"),
                        "--checkpoint", str(tmp_path / "none")], capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 1 and p.stderr.strip().splitlines()[-1].startswith("tspo-fast eval: error: --checkpoint:")


def test_missing_local_model_path_is_a_missing_folder(tmp_path):
    from tspo_fast.models import resolve_model_path

    for path in (str(tmp_path / "no-such-model"), "./no-such-model", "runs/x/model"):
        with pytest.raises(FileNotFoundError, match=r"^model.path: no model folder at .*does not exist"):
            resolve_model_path(path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="folder without config.json"):
        resolve_model_path(str(tmp_path / "empty"))
    assert resolve_model_path("Qwen/Qwen2.5-3B") == "Qwen/Qwen2.5-3B"      # a hub id is left to the hub


# ----------------------------------------------------------------------------- what the second hostile pass found
def test_a_key_given_twice_in_a_file_is_refused_naming_both_lines(tmp_path):
    cfg = tmp_path / "dup.yaml"
    cfg.write_text("rollout:\n  n: 2\ntrain:\n  lr: 1.0e-3\nrollout:\n  max_turns: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(cfg))
    assert str(e.value) == (f"{cfg}:5:1: duplicate key 'rollout' (first given at line 1); YAML would keep only "
                            "the last one"), str(e.value)
    cfg.write_text("rollout:\n  n: 2\n  max_turns: 3\n  n: 4\n")               # inside a section too
    with pytest.raises(ConfigError, match=rf"^{cfg}:4:3: duplicate key 'n' \(first given at line 2\)"):
        load_config(str(cfg))
    with pytest.raises(ConfigError, match="--set data.train_files: .*duplicate key 'a'"):
        load_config(None, ["data.train_files={a: 1, a: 2}"])
    cfg.write_text("base: &b {n: 2, max_turns: 3}\n")                            # a merge is not a repeat
    import yaml

    from tspo_fast.config import _UniqueKeyLoader
    assert yaml.load("a: &x {n: 1}\nb:\n  <<: *x\n  n: 2\n", Loader=_UniqueKeyLoader) == {"a": {"n": 1}, "b": {"n": 2}}


@pytest.mark.parametrize("text", ["", "# only a comment\n", "{}\n", "\n\n"])
def test_an_empty_config_file_is_refused(tmp_path, text):
    cfg = tmp_path / "empty.yaml"
    cfg.write_text(text)
    with pytest.raises(ConfigError, match=rf"^{cfg}: the config file has no settings"):
        load_config(str(cfg))


def test_yaml_errors_give_line_and_column(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("rollout:\n  n: 2\n  max_turns: [1, 2\ntrain:\n  lr: 1\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(cfg))
    msg = str(e.value)
    assert msg.startswith(f"{cfg}:4:6: not valid YAML: ") and "flow sequence" in msg and "\n" not in msg, msg
    cfg.write_text("rollout:\n  n: 2\n    max_turns: 3\n")
    with pytest.raises(ConfigError, match=rf"^{cfg}:3:14: not valid YAML: mapping values are not allowed here"):
        load_config(str(cfg))
    cfg.write_bytes(b"rollout:\n  n: \xff\n")
    with pytest.raises(ConfigError, match=rf"^{cfg}: not UTF-8 text"):
        load_config(str(cfg))


def test_a_section_that_is_not_a_mapping_is_blamed_on_the_file_not_on_set(tmp_path):
    cfg = tmp_path / "t5.yaml"
    cfg.write_text("train: 5\n")
    for overrides in ([], ["train.lr=1e-3"]):
        with pytest.raises(ConfigError) as e:
            load_config(str(cfg), overrides)
        assert str(e.value) == f"{cfg}: train: expected a mapping of its fields, got 5", str(e.value)
    cfg.write_text("model:\n  lora: [8]\n")
    with pytest.raises(ConfigError, match=rf"^{cfg}: model.lora: expected a mapping of its fields, got \[8\]"):
        load_config(str(cfg), ["model.lora.rank=4"])
    with pytest.raises(ConfigError, match=r"^--set seed.x: seed is not a section"):   # an override's own fault
        load_config(os.path.join(ROOT, "configs", "tiny.yaml"), ["seed.x=1"])


def test_a_model_path_that_is_a_file_and_a_retrieval_url_that_is_not_one_are_caught_at_load(tmp_path):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"\0" * 8)
    with pytest.raises(ConfigError, match=rf"^model.path: {weights} is a file; give the model's folder"):
        load_config(None, [f"model.path={weights}"])
    for url in ("notaurl", "ftp://host/retrieve", "http://:8000/retrieve", "http://host:99999/retrieve", "127.0.0.1:8000"):
        with pytest.raises(ConfigError, match=r"^retrieval.url: .* is not an http\(s\) URL with a host"):
            load_config(None, [f"retrieval.url={url}"])
    for url in ("http://127.0.0.1:8000", "https://search.example.org/retrieve", "http://[::1]:8000/retrieve"):
        assert load_config(None, [f"retrieval.url={url}"]).retrieval.url == url
    with pytest.raises(ConfigError, match=r"^train.max_update_kl: must be >= 0"):
        load_config(None, ["train.max_update_kl=-1"])
