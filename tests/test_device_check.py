"""The device check's logic, on CPU (bench/device_check/ and bench/device_check.sh): the two parts
fit their budgets and every step's cap covers its estimate, time limits shrink when the part runs
late, PASS / MISS per target from pytest-benchmark / junit / kgraph output, the summary writer,
the runner's time limit, a part run through on this machine, and ``--help`` running nothing."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from device_check import budget, parse, runner, summary  # noqa: E402  (bench/ on sys.path first)
from device_check.verdicts import (  # noqa: E402  (bench/ on sys.path first)
    correctness_verdicts,
    k1_k2_verdicts,
    k3_verdicts,
    trainer_verdicts,
)

H100 = "NVIDIA H100 80GB HBM3"


# ---------------------------------------------------------------------------- the budget
def test_parts_fit_their_budgets_and_caps_cover_estimates():
    assert budget.check_budgets() == []
    for part, limit in (("kernels", 540), ("trainer", 300)):
        steps = budget.steps_of(part)
        assert budget.PART_BUDGET_S[part] == limit
        assert budget.SETUP_S[part] + sum(s.cap_s for s in steps) + budget.WRAPUP_S <= limit
        assert all(s.cap_s >= budget.CAP_OVER_ESTIMATE * s.estimate_s for s in steps)
    assert [s.name for s in budget.steps_of("kernels")] == ["tests", "k3check", "kgraph", "k1k2", "k3", "liger",
                                                            "compile"]
    assert [s.name for s in budget.steps_of("trainer")] == ["update", "train"]


def test_estimates_of_the_benchmark_steps_follow_the_measured_call_times():
    """The K3 step's estimate is the measured per-call times x the calls the benchmark makes."""
    calls = budget.k3_calls(["tspo_dense"])
    assert calls == pytest.approx(7 * (0.1543 + 0.2356))
    assert budget.k3_calls(["liger_fused_linear_grpo"]) == pytest.approx(5 * (1.057 + 2.101))
    k3 = next(s for s in budget.STEPS if s.name == "k3")
    assert k3.estimate_s > budget.k3_calls(budget.K3_FAST) > 20


def test_step_limits_shrink_when_the_part_runs_late():
    assert budget.step_limit(110, 25, 540) == 110
    assert budget.step_limit(85, 450, 540) == 540 - 450 - budget.KILL_GRACE_S - budget.WRAPUP_S
    assert budget.step_limit(85, 520, 540) == 0                 # less than MIN_STEP_S left: skipped


def test_parts_and_steps_are_checked():
    with pytest.raises(ValueError, match="--part: must be one of kernels, trainer"):
        budget.steps_of("all")
    with pytest.raises(ValueError, match="STEPS: train not a step of the kernels part"):
        budget.steps_of("kernels", ["tests", "train"])
    assert [s.name for s in budget.steps_of("kernels", ["k3", "tests"])] == ["tests", "k3"]      # run order


# ---------------------------------------------------------------------------- verdicts
def _bench(impl, N, median, *, kind="fwd", inputs="uniform", peak=None, **extra):
    group = "k3-cuda-fwd-bwd" if kind == "fwd" else "k3-cuda-logprobs"
    ex = dict(N=N, impl=impl, inputs=inputs, device=H100, **extra)
    if peak is not None:
        ex["peak_extra_GiB"] = peak
    return {"name": f"test_cuda_{impl}", "group": group, "extra_info": ex,
            "stats": {"median": median, "mean": median, "rounds": 5}}


def _k3_run(dense=(0.080, 0.165), peaks=(3.2, 3.3), filtered=(0.055, 0.11)):
    out = []
    for i, N in enumerate((16384, 32768)):
        floor = (0.0774, 0.1592)[i]
        out += [_bench("matmul_floor", N, floor), _bench("tspo_dense", N, dense[i], peak=peaks[i]),
                _bench("compiled_eager", N, (0.0851, 0.1729)[i]), _bench("liger_triton_grpo_loss", N, (0.0768, 0.158)[i]),
                _bench("matmul_floor", N, floor, inputs="lm_like"),
                _bench("tspo_filtered", N, filtered[i], inputs="lm_like", skipped_fraction=0.4),
                _bench("tspo_logprobs", N, (0.0300, 0.0590)[i], kind="logprobs"),
                _bench("one_product", N, (0.0295, 0.0580)[i], kind="logprobs")]
    return out


def _by_name(verdicts):
    return {v.name.split(" (")[0] if v.name.startswith("K3 dense target") else v.name: v for v in verdicts}


def test_k3_targets_pass_when_met():
    vs = k3_verdicts(_k3_run())
    labels = {v.name: v.label for v in vs if v.target}
    assert labels == {
        "K3 dense fwd+bwd <= 1.10x the three-product floor of this run (uniform)": "PASS",
        "K3 dense faster than torch.compile of the eager loss": "PASS",
        "K3 dense faster than Liger's triton_grpo_loss": "MISS",       # 80 ms vs 76.8 ms at N = 16384
        "K3 dense peak <= 4 GiB, flat in N (<= 1.10x)": "PASS",
        "K3 dense target (the four lines above)": "MISS",
        "K3 filtered <= 0.75x the floor on LM-like inputs (threshold 2^-12)": "PASS",
        "K3 log-probs <= 1.05x one product": "PASS",
    }
    line = next(v.line() for v in vs if v.name.startswith("K3 filtered <="))
    assert "N=16384: 0.71x" in line and "skipped 0.400" in line


def test_k3_misses_and_unmeasured():
    vs = {v.name: v for v in k3_verdicts(_k3_run(dense=(0.154, 0.236), peaks=(3.2, 3.9), filtered=(0.07, 0.13)))}
    assert vs["K3 dense fwd+bwd <= 1.10x the three-product floor of this run (uniform)"].label == "MISS"
    assert vs["K3 dense peak <= 4 GiB, flat in N (<= 1.10x)"].label == "MISS"            # 3.9 / 3.2 = 1.22x
    assert vs["K3 filtered <= 0.75x the floor on LM-like inputs (threshold 2^-12)"].label == "MISS"
    one_n = [b for b in _k3_run() if b["extra_info"]["N"] == 16384]
    vs = {v.name: v for v in k3_verdicts(one_n)}
    assert vs["K3 dense peak <= 4 GiB, flat in N (<= 1.10x)"].label == "----"            # flatness needs two N
    assert vs["K3 dense target (the four lines above)"].label in ("MISS", "----")
    none = k3_verdicts([])
    assert all(v.label == "----" for v in none)                # nothing measured is never a PASS


def test_k1_k2_targets_on_cuda_figures_only():
    benches = [{"name": "test_k1_triton", "extra_info": {"device": H100}, "stats": {"median": 28e-6}},
               {"name": "test_k2_triton", "extra_info": {"device": H100}, "stats": {"median": 40e-6}},
               {"name": "test_k2_memory_floor", "extra_info": {"device": H100}, "stats": {"median": 25e-6}}]
    k1, k2 = k1_k2_verdicts(benches, {})
    assert k1.label == "PASS" and k2.label == "MISS" and "1.60x" in k2.detail
    # no wall-clock figures: the CUDA-graph replay decides
    k1, k2 = k1_k2_verdicts([], {"k1": {"graph_us": "12.5", "events_us": "14.0"},
                                 "k2": {"graph_us": "13.0"}, "k2_copy_floor": {"graph_us": "9.0"}})
    assert k1.label == "PASS" and k2.label == "PASS"
    # the interpreter's figures on a CPU are not judged
    cpu = [dict(b, extra_info={"device": "cpu"}) for b in benches]
    assert [v.label for v in k1_k2_verdicts(cpu, {})] == ["----", "----"]


def test_correctness_verdicts(tmp_path):
    xml = tmp_path / "junit.xml"
    xml.write_text('<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1">'
                   '<testcase classname="tests.test_pg_loss" name="test_a"/>'
                   '<testcase classname="tests.test_pg_loss" name="test_b"><failure message="boom&#10;more"/></testcase>'
                   '<testcase classname="tests.test_pg_loss" name="test_c"><skipped message="no dtype_out"/></testcase>'
                   '</testsuite></testsuites>')
    counts = parse.junit(str(xml))
    assert (counts.tests, counts.passed, counts.failures, counts.skipped) == (3, 1, 1, 1)
    assert counts.failed == ["FAILURE tests.test_pg_loss::test_b: boom"]
    tests, check = correctness_verdicts(counts, ["PASS a", "FAIL b: x", "k3check (CUDA, compiled): 1 passed, 1 failed"])
    assert tests.label == "MISS" and check.label == "MISS"
    ok = parse.junit(str(xml))
    ok.failures, ok.failed = 0, []
    assert correctness_verdicts(ok, [], collected=3)[0].label == "PASS"
    log = tmp_path / "tests.log"                               # the step cut at its limit: 3 of 245 ran
    log.write_text("platform linux\ncollected 245 items\n\ntests/test_first_occurrence.py ...\n")
    cut = correctness_verdicts(ok, [], collected=parse.collected(str(log)))[0]
    assert cut.label == "MISS" and "only 3 of the 245 collected ran" in cut.detail
    missing = parse.junit(str(tmp_path / "none.xml"))
    assert correctness_verdicts(missing, [])[0].label == "----"
    cut = correctness_verdicts(None, ["PASS a"])                # the check was cut before its total line
    assert cut[0].label == "MISS" and "did not finish" in cut[0].detail


def test_trainer_verdicts():
    update = {"device": "cuda", "rows": 40, "tokens": 9000,
              "modes": {"padded+old": {"logprobs_s": 0.6, "update_s": 0.9}, "packed": {"logprobs_s": 0.2, "update_s": 0.5}}}
    metrics = [{"step": s, "time/step": 2.0, "loss/pg": 0.01 * s} for s in (1, 2, 3)] + [{"step": 3, "eval/em": 0.2}]
    labels = [v.label for v in trainer_verdicts(update, metrics)]
    assert labels == ["PASS", "PASS", "PASS", "PASS"]
    metrics[1]["loss/pg"] = float("nan")
    assert [v.label for v in trainer_verdicts(update, metrics[:2])][2:] == ["MISS", "MISS"]
    assert [v.label for v in trainer_verdicts(None, None)] == ["----"] * 4


# ---------------------------------------------------------------------------- parsing and the summary
def test_steps_txt_round_trip(tmp_path):
    p = str(tmp_path / "steps.txt")
    parse.write_step(p, parse.StepRecord("tests", 0, 71.25, 110))
    parse.write_step(p, parse.StepRecord("k3", 124, 119.9, 110))
    parse.write_step(p, parse.StepRecord("liger", None, 0.0, 0, "pytest-benchmark does not import"))
    recs = parse.steps(p)
    assert [(r.name, r.rc, r.timed_out) for r in recs] == [("tests", 0, False), ("k3", 124, True), ("liger", None, False)]
    assert recs[2].note == "pytest-benchmark does not import"


def test_kgraph_lines_and_cut_jsonl(tmp_path):
    log = tmp_path / "kgraph.log"
    log.write_text("noise\nKGRAPH k1 events_us=14.20 graph_us=11.90\nKGRAPH skipped: no CUDA\n")
    assert parse.key_values(str(log), "KGRAPH") == {"k1": {"events_us": "14.20", "graph_us": "11.90"}}
    m = tmp_path / "metrics.jsonl"
    m.write_text('{"step": 1}\n{"step": 2, "time/st')      # the last line cut by a time limit
    assert parse.jsonl(str(m)) == [{"step": 1}]


def test_summary_of_the_kernels_part(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    out.mkdir()
    work.mkdir()
    (out / "env.txt").write_text(f"python 3.12.3 /opt/py\ntorch 2.11.0+cu130 cuda 13.0 available True\n"
                                 f"device {H100} cc 9.0 SMs 132 memory GiB 79.2\npip: torch  2.11.0\n")
    (out / "tests_junit.xml").write_text('<testsuite tests="2" failures="0" errors="0" skipped="0">'
                                         '<testcase classname="t" name="a"/><testcase classname="t" name="b"/>'
                                         '</testsuite>')
    (work / "k3check.log").write_text("PASS pg_loss plain\n    [x: 1 s]\nk3check (CUDA, compiled): 1 passed, 0 failed\n")
    (work / "bench_k3.json").write_text(json.dumps({"machine_info": {"node": "gpu"}, "benchmarks": _k3_run()}))
    (work / "bench_liger.json").write_text("")                # nothing ran: left empty by pytest-benchmark
    (work / "kgraph.log").write_text("KGRAPH ceiling_copy TBps=3.010 ms=0.7\nKGRAPH ceiling_bf16_mm TFLOPs=798.0 ms=1.4\n")
    parse.write_step(str(work / "steps.txt"), parse.StepRecord("tests", 0, 70.0, 110))
    parse.write_step(str(work / "steps.txt"), parse.StepRecord("k3", 124, 121.0, 110))
    text = summary.write_summary("kernels", str(out), str(work))
    assert (out / "summary.txt").read_text() == text
    assert json.loads((out / "bench.json").read_text())["machine_info"] == {"node": "gpu"}
    assert text.startswith(f"== device: python 3.12.3 /opt/py; torch 2.11.0+cu130 cuda 13.0 available True; "
                           f"device {H100}")
    assert "== tests: 2 run, 2 passed, 0 failed, 0 errors, 0 skipped" in text
    assert "k3check (CUDA, compiled): 1 passed, 0 failed" in text
    assert re.search(r"== K3 forward \+ backward, N=16384.*\n.*\n\s+lm_like\s+tspo_filtered", text)
    assert "device-to-device copy 3.010 TB/s" in text and "798.0 TFLOP/s" in text
    assert "k3       rc 124   121.0 s of 110 s  cap 110 s, estimate 72 s  <- cut at its time limit" in text
    verdicts = text.split("== verdicts, part kernels")[1]
    assert "[PASS] kernel tests all pass" in verdicts and "[PASS] K3 check on device tensors all pass" in verdicts
    assert "[PASS] K3 log-probs <= 1.05x one product" in verdicts
    assert text.rstrip().splitlines()[-1].strip().startswith("[----] K2")      # the verdicts come last


def test_summary_of_the_trainer_part(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    (work / "train_run").mkdir(parents=True)
    out.mkdir()
    (work / "update_step.json").write_text(json.dumps({
        "device": "cuda", "rows": 40, "tokens": 9000,
        "modes": {"padded+old": {"logprobs_s": 0.6, "update_s": 0.9, "peak_gib": 3.0},
                  "packed": {"logprobs_s": 0.2, "update_s": 0.5, "peak_gib": 2.0}}}))
    (work / "train_run" / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "time/step": 2.5, "time/rollout": 1.0, "loss/pg": 0.1}) + "\n" for s in (1, 2))
        + json.dumps({"step": 3, "eval/em": 0.1}) + "\n")
    text = summary.write_summary("trainer", str(out), str(work))
    assert "== ZeRO-3 update" in text and "packed" in text and "step 2: 2.50 s (rollout 1.00 s)" in text
    assert "[PASS] packed >= 1.6x padded+old on log-probs + update: 2.14x" in text
    assert "[MISS] trainer runs 3 steps with finite losses: 2 steps" in text
    assert "[PASS] trainer evaluates: step 3: EM 0.1" in text


def test_device_check_uses_no_private_kernel_names_but_the_tests_own():
    """Only the public API of tspo_kernels and what tests/test_pg_loss.py itself uses of pg_loss."""
    src = "".join(p.read_text() for p in (ROOT / "bench" / "device_check").glob("*.py"))
    assert set(re.findall(r"pg_mod\.(_\w+)", src)) <= {"_ACC_OVERRIDE", "_dtype_out_ok"}
    assert "from tspo_kernels.pg_loss import" not in src


# ---------------------------------------------------------------------------- the runner and the shell
def test_a_step_at_its_limit_is_interrupted(tmp_path):
    """At its limit a step gets SIGINT (Python: KeyboardInterrupt, so pytest still writes its
    results), also when this process was started with SIGINT ignored, as a shell starts background
    jobs; its exit code is recorded as 124."""
    log = tmp_path / "step.log"
    child = ("import time\nprint('started', flush=True)\ntry:\n    time.sleep(60)\n"
             "except KeyboardInterrupt:\n    print('interrupted: results written', flush=True)\n")
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        t = time.monotonic()
        rc, secs = runner.run_step([sys.executable, "-u", "-c", child], str(log), 1.0, echo=None)
    finally:
        signal.signal(signal.SIGINT, before)
    assert rc == 124 and secs < 1.0 + budget.KILL_GRACE_S / 2 and time.monotonic() - t < 30
    assert "started" in log.read_text() and "interrupted: results written" in log.read_text()
    rc, _ = runner.run_step([sys.executable, "-c", "import sys; print('done'); sys.exit(3)"], str(log), 30, echo=None)
    assert rc == 3 and log.read_text().count("done") == 1


def test_commands_follow_what_is_installed(tmp_path):
    ctx = runner.Context(part="kernels", out=str(tmp_path / "o"), work=str(tmp_path / "w"), root=str(ROOT), t0=0,
                         budget=540, cuda=True, have={"xdist": True, "pytest_timeout": True, "pytest_benchmark": False})
    tests = runner.command("tests", ctx)
    assert tests.argv[3:6] == runner.KERNEL_TESTS and "-n" in tests.argv and "--timeout=120" in tests.argv
    assert runner.command("k3", ctx) == "pytest-benchmark does not import (carry .device_wheels)"
    ctx.have["pytest_benchmark"] = True
    assert runner.command("k3", ctx).argv[-2] == "not liger and not compiled_eager and not test_cpu_"
    ctx.cuda = False
    assert "-n" not in runner.command("tests", ctx).argv
    assert runner.command("update", ctx).startswith("deepspeed does not import")
    ctx.have.update(deepspeed=True, bm25s=True)
    assert "--small" in runner.command("update", ctx).argv
    assert "rollout.engine=hf" in runner.command("train", ctx).argv
    assert "TRITON_INTERPRET" not in runner.step_env(runner.Context(**{**ctx.__dict__, "cuda": True}))


def test_a_part_runs_through_on_cpu(tmp_path):
    """The kernels part's kgraph step through the real runner (no CUDA: it says so and exits 0):
    steps.txt, summary.txt, raw.tar.gz, and no more files in $OUT than the device tool brings back.
    The limits are scaled up (the mechanics are tested, not this machine's speed)."""
    out, work = tmp_path / "out", tmp_path / "work"
    ctx = runner.context("kernels", str(out), str(work), time_scale=20)
    text = runner.run_part(ctx, ["kgraph"], echo=None)
    assert [(r.name, r.rc) for r in parse.steps(str(work / "steps.txt"))] == [("kgraph", 0)]
    assert "KGRAPH skipped: no CUDA" in (out / "bench.log").read_text()
    assert (out / "summary.txt").read_text() == text and "== verdicts, part kernels" in text
    assert sorted(os.listdir(out)) == ["bench.log", "raw.tar.gz", "summary.txt"]
    assert len(os.listdir(out)) <= runner.MAX_OUT_FILES


def test_shell_help_runs_nothing(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path / "out"), DEVICE_WORK=str(tmp_path / "work"))
    p = subprocess.run(["bash", str(ROOT / "bench" / "device_check.sh"), "--help"], env=env, capture_output=True,
                       text=True, timeout=30)
    assert p.returncode == 0 and p.stdout.startswith("usage:") and "--part kernels" in p.stdout
    assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists()
    p = subprocess.run(["bash", str(ROOT / "bench" / "device_check.sh"), "--part", "everything"], env=env,
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 2 and "--part must be kernels or trainer" in p.stderr
    assert not (tmp_path / "out").exists()


def test_plan_prints_every_step():
    p = subprocess.run([sys.executable, "-m", "device_check", "plan"], cwd=ROOT / "bench", capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    for s in budget.STEPS:
        assert re.search(rf"^\s+{s.name}\s+cap\s+{s.cap_s} s", p.stdout, re.M)
