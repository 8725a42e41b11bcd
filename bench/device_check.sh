#!/usr/bin/env bash
# One-shot check of the Triton kernels on a lent GPU (H100 / H200), run from the repo root:
#
#     OUT=$OUT bash bench/device_check.sh          (carry: .device_wheels)
#
# (a) $OUT/env.txt: date, nvidia-smi, Python / torch / triton versions, the offline installs;
# (b) installs what the GPU image may lack from the carried wheels in .device_wheels/ (only
#     packages that are missing: liger-kernel, pytest-benchmark, pytest-timeout, pytest-xdist
#     and their pure-Python needs) and makes `tspo_kernels` importable (the repository root on
#     PYTHONPATH, nothing built);
# (c) the kernel correctness tests (tests/test_first_occurrence.py, test_advantages.py,
#     test_pg_loss.py) with TRITON_INTERPRET unset, so the compiled kernels run (tests/conftest.py
#     runs the CPU-built test inputs through the GPU), then a K3 check at large vocabularies
#     (V > 4096: several BLOCK_V blocks per row, which the small tests do not reach on CUDA);
# (d) the kernel benchmarks: bench/test_bench_k1_k2.py, bench/test_bench_pg_loss.py (ours, eager,
#     matmul floor; then liger-kernel; then torch.compile last, it compiles for a minute);
#     the DeepSpeed / vLLM benchmarks (rollout, trainer, retrieval) are not run;
# (e) $OUT/summary.txt (and stdout, last): test counts, failures, and per benchmark the mean /
#     median time and the ratio to our kernel in the same comparison.
#
# Every step has its own time limit, cut to what is left of DEVICE_BUDGET_S (default 340 s),
# so the whole script ends within about that (+ ~15 s).  A step at its limit gets SIGINT, so
# pytest still writes the junit / benchmark JSON of what finished.  STEPS (default "tests
# k3check k1k2 k3 liger compile") picks steps for a rerun; XDIST_WORKERS (default 8, 0 = off)
# sets the test processes on CUDA.  No `set -e`: a failed step does not stop the later ones.
# $OUT receives at most 7 files (the device tool brings back 8).
set -x
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-/tmp/devout}
mkdir -p "$OUT"
WORK=${DEVICE_WORK:-/tmp/devwork}
rm -rf "$WORK"
mkdir -p "$WORK"
PY=${PYTHON:-python3}
BUDGET=${DEVICE_BUDGET_S:-340}
STEPS=${STEPS:-"tests k3check k1k2 k3 liger compile"}
T0=$SECONDS
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

# seconds for a step: its cap, cut to what is left of the budget minus `reserve`; 0 = skip
limit() {
  local cap=$1 reserve=${2:-10}
  local left=$(( BUDGET - (SECONDS - T0) - reserve ))
  (( left < cap )) && cap=$left
  (( cap < 10 )) && cap=0
  echo "$cap"
}
want() { [[ " $STEPS " == *" $1 "* ]]; }

# ------------------------------------------------------------------ (a) environment
{
  echo "== date"; date -u +%Y-%m-%dT%H:%M:%SZ
  echo "== host"; uname -a; nproc; free -g 2>/dev/null | head -2
  echo "== nvidia-smi"; nvidia-smi 2>&1
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw --format=csv 2>&1
  echo "== python"; command -v "$PY"
  "$PY" - <<'EOF' 2>&1
import sys, torch, triton
print("python", sys.version.split()[0], sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
print("triton", triton.__version__)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, "cc", f"{p.major}.{p.minor}", "SMs", p.multi_processor_count,
          "memory GiB", round(p.total_memory / 2**30, 1))
EOF
} > "$OUT/env.txt" 2>&1

# ------------------------------------------------------------------ (b) installs
WHEELS=.device_wheels
PKGS="liger-kernel pytest-benchmark pytest-timeout py-cpuinfo pytest-xdist execnet"
{
  echo "== pip install (offline, missing packages only) from $WHEELS"
  ls -la "$WHEELS" 2>&1
  if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    # a package already there is left as it is ("Requirement already satisfied")
    if ! "$PY" -m pip install --no-index --find-links "$WHEELS" --no-deps --no-compile \
         --disable-pip-version-check $PKGS; then
      echo "== install into the environment failed; into /tmp/site instead"
      "$PY" -m pip install --no-index --find-links "$WHEELS" --no-deps --no-compile \
        --disable-pip-version-check --target /tmp/site $PKGS \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
  else
    echo "no wheels in $WHEELS (pass it in the device tool's carry list)"
  fi
} >> "$OUT/env.txt" 2>&1
# tspo_kernels (and tspo_fast) import from the repository root: nothing to build
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

CUDA=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
if [ "$CUDA" = 1 ]; then
  unset TRITON_INTERPRET      # the compiled kernels, not the interpreter
fi
has() { "$PY" -c "import $1" >/dev/null 2>&1 && echo 1 || echo 0; }
HAVE_TIMEOUT=$(has pytest_timeout)
HAVE_XDIST=$(has xdist)
HAVE_BENCH=$(has pytest_benchmark)
{
  echo "== after installs"
  "$PY" -m pip list --disable-pip-version-check 2>/dev/null \
    | grep -i -E "^(torch|triton|pytest|pytest-benchmark|pytest-timeout|pytest-xdist|execnet|py-cpuinfo|liger.kernel|transformers|numpy) "
  "$PY" -c "import tspo_kernels; print('tspo_kernels from', tspo_kernels.__file__)" 2>&1
  "$PY" -c "import liger_kernel.chunked_loss, liger_kernel.transformers.grpo_loss; print('liger_kernel imports')" 2>&1 | tail -3
  echo "CUDA=$CUDA TRITON_INTERPRET=${TRITON_INTERPRET-<unset>} pytest_timeout=$HAVE_TIMEOUT xdist=$HAVE_XDIST pytest_benchmark=$HAVE_BENCH"
  echo "PYTHONPATH=$PYTHONPATH"
} >> "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

PYTEST_TIMEOUT=""
[ "$HAVE_TIMEOUT" = 1 ] && PYTEST_TIMEOUT="--timeout=150"

# ------------------------------------------------------------------ helper scripts
cat > "$WORK/k3check.py" <<'EOF'
"""K3 against the float64 reference at vocabularies above one BLOCK_V (4096 on CUDA): the
row kernel's multi-block loop and masked tail, which the small tests only reach in the
interpreter.  Reuses tests/test_pg_loss.py's case builder and reference."""
import os
import sys
import time

import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")        # dry run on a CPU machine
sys.path.insert(0, "tests")
import test_pg_loss as T  # noqa: E402

from tspo_kernels import fused_linear_logprobs, fused_linear_pg_loss  # noqa: E402
from tspo_kernels.reference import logprobs_reference  # noqa: E402

dev = torch.device("cuda" if CUDA else "cpu")
f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
# (options, dtype, N, H, V, chunk_size)
CASES = [("plain", f32, 64, 64, 5000, 16), ("all", f32, 48, 32, 152064, 16),
         ("all", bf16, 64, 64, 40000, None), ("kl_clamped", f16, 64, 64, 9000, 32),
         ("all", f32, 1000, 128, 8192, None), ("asym_clip", bf16, 96, 64, 152064, 48)]
if not CUDA:   # the interpreter: small shapes (its BLOCK_V is 128, so V = 300 spans 3 blocks)
    CASES = [("plain", f32, 24, 16, 300, 8), ("all", bf16, 20, 16, 300, None)]


def on(x):
    return x.to(dev) if isinstance(x, torch.Tensor) else x


def errors(got, want, dtype):
    errs = {}
    for k in want:
        if k == "loss_scale":
            continue
        g = got[k]
        if not torch.isfinite(g).all():
            errs[k] = float("inf")
        elif k == "loss":
            errs[k] = float((g.double() - want[k]).abs() / max(abs(float(want[k])), want["loss_scale"]))
        else:
            errs[k] = T.rel(g, want[k])
    return errs


passed = failed = 0
for i, (opts, dtype, N, H, V, chunk) in enumerate(CASES):
    name = f"pg_loss {opts} {str(dtype).split('.')[-1]} N={N} H={H} V={V} chunk={chunk}"
    try:
        t = time.time()
        args, kw = T.make_case(500 + i, N, H, V, dtype, opts=T.OPTION_SETS[opts])
        got = T.run(fused_linear_pg_loss, tuple(on(a) for a in args), {k: on(v) for k, v in kw.items()},
                    chunk_size=chunk, backend="triton")
        got = {k: v.cpu() for k, v in got.items()}
        errs = errors(got, T.reference_of(args, kw), dtype)
        worst = max(errs, key=errs.get)
        ok = errs[worst] <= T.TOL[dtype]
        print(f"{'PASS' if ok else 'FAIL'} {name}: worst {worst} rel err {errs[worst]:.2e} "
              f"(tol {T.TOL[dtype]:.0e}) [{time.time() - t:.1f} s]")
        if not ok:
            print("    all:", {k: f"{v:.2e}" for k, v in errs.items()})
        passed, failed = passed + ok, failed + (not ok)
    except Exception as exc:  # noqa: BLE001
        failed += 1
        print(f"FAIL {name}: {type(exc).__name__}: {str(exc)[:500]}")

for dtype, V in ((f32, 152064), (bf16, 40000)):
    if not CUDA:
        V = 300
    name = f"logprobs {str(dtype).split('.')[-1]} N=64 H=64 V={V}"
    try:
        args, kw = T.make_case(900 + V % 97, 64, 64, V, dtype, opts={"bias": True, "temperature": 0.7})
        h, w, y = args[:3]
        lp, ent = fused_linear_logprobs(on(h), on(w), on(y), bias=on(kw["bias"]), temperature=0.7,
                                        return_entropy=True, backend="triton")
        want_lp, want_ent = logprobs_reference(h.double(), w.double(), y, bias=kw["bias"].double(),
                                               temperature=0.7, return_entropy=True)
        e1, e2 = T.rel(lp.cpu(), want_lp), T.rel(ent.cpu(), want_ent)
        ok = max(e1, e2) <= T.TOL[dtype] and torch.isfinite(lp).all() and torch.isfinite(ent).all()
        print(f"{'PASS' if ok else 'FAIL'} {name}: logp rel err {e1:.2e}, entropy {e2:.2e}")
        passed, failed = passed + bool(ok), failed + (not ok)
    except Exception as exc:  # noqa: BLE001
        failed += 1
        print(f"FAIL {name}: {type(exc).__name__}: {str(exc)[:500]}")

print(f"k3check ({'CUDA, compiled' if CUDA else 'CPU, interpreter'}): {passed} passed, {failed} failed")
sys.exit(1 if failed else 0)
EOF

cat > "$WORK/summary.py" <<'EOF'
"""Summary of the device check: test counts and failures, the K3 check, and the benchmarks
(mean / median per benchmark and its ratio to our kernel in the same comparison)."""
import glob
import json
import os
import sys
import xml.etree.ElementTree as ET

out, work = sys.argv[1], sys.argv[2]
lines = []
say = lines.append


def fmt(s):
    if s is None:
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.1f} us"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


try:
    env = open(os.path.join(out, "env.txt"), errors="replace").read().splitlines()
    first = {}
    for l in env:
        for p in ("device ", "torch ", "triton ", "python "):
            if l.startswith(p) and "  " not in l:       # not the pip list lines
                first.setdefault(p, l)
    say("== device: " + "; ".join(first.values()))
except OSError:
    pass
try:
    mode = [l.strip() for l in open(os.path.join(out, "tests.log"), errors="replace") if l.startswith("tspo_kernels:")]
    if mode:
        say("== " + mode[0])
except OSError:
    pass

# ---------------------------------------------------------------- tests
junit = os.path.join(out, "tests_junit.xml")
if os.path.exists(junit):
    try:
        root = ET.parse(junit).getroot()
        suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
        n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
        say(f"== tests: {n['tests']} run, {n['tests'] - n['failures'] - n['errors'] - n['skipped']} passed, "
            f"{n['failures']} failed, {n['errors']} errors, {n['skipped']} skipped")
        for case in root.iter("testcase"):
            for tag in ("failure", "error"):
                bad = case.find(tag)
                if bad is not None:
                    msg = (bad.get("message") or "").splitlines()
                    say(f"   {tag.upper()} {case.get('classname')}::{case.get('name')}: {msg[0][:160] if msg else ''}")
            skip = case.find("skipped")
            if skip is not None:
                say(f"   skipped {case.get('name')}: {(skip.get('message') or '')[:100]}")
    except Exception as exc:  # noqa: BLE001
        say(f"== tests: could not read {junit}: {exc}")
else:
    say("== tests: no junit file (step skipped, killed by its time limit, or pytest did not start); see tests.log")

k3 = os.path.join(work, "k3check.log")
if os.path.exists(k3):
    say("== K3 large-vocabulary check")
    for l in open(k3, errors="replace").read().splitlines():
        if l.startswith(("PASS", "FAIL", "k3check", "    all")) or "Error" in l:
            say("   " + l[:220])

# ---------------------------------------------------------------- benchmarks
benches, machine = [], None
for part in sorted(glob.glob(os.path.join(work, "bench_*.json"))):
    if os.path.getsize(part) == 0:       # pytest-benchmark leaves it empty when nothing ran
        continue
    try:
        data = json.load(open(part))
    except Exception as exc:  # noqa: BLE001
        say(f"== {os.path.basename(part)}: unreadable ({exc})")
        continue
    machine = machine or data.get("machine_info")
    for b in data.get("benchmarks", []):
        b["part"] = os.path.basename(part)[6:-5]
        benches.append(b)
if benches:
    json.dump({"machine_info": machine, "benchmarks": benches}, open(os.path.join(out, "bench.json"), "w"), indent=1)


def key(b):
    """(comparison set, is-ours) for a benchmark."""
    name, ex = b["name"], b.get("extra_info", {})
    impl = ex.get("impl") or (b.get("params") or {}).get("impl", "")
    if name.startswith("test_k1_"):
        return "K1 first occurrence", name == "test_k1_triton"
    if name.startswith("test_k2_"):
        return "K2 turn advantages", name == "test_k2_triton"
    N = ex.get("N") or (b.get("params") or {}).get("N")
    group = b.get("group") or "k3"
    if group.startswith("k3-cuda-fwd-bwd"):
        return f"K3 fwd+bwd N={N}", impl == "tspo_triton"
    if group.startswith("k3-cuda-logprobs"):
        return "K3 forward log-probs (ours only)", True
    if group.startswith("k3-cpu"):
        return f"{group} (CPU)", impl == "fused_torch_path"
    return group, False


if benches:
    sets = {}
    for b in benches:
        s, ours = key(b)
        sets.setdefault(s, []).append((ours, b))
    say("== benchmarks (x ours = this mean / our kernel's mean in the same set; > 1: ours is faster)")
    say(f"   {'set':<34} {'benchmark':<52} {'mean':>10} {'median':>10} {'rounds':>6} {'x ours':>7} {'peak GiB':>8}")
    for s, items in sets.items():
        ours = [b["stats"]["mean"] for o, b in items if o]
        ref = ours[0] if ours else None
        for o, b in sorted(items, key=lambda ob: ob[1]["stats"]["mean"]):
            st, ex = b["stats"], b.get("extra_info", {})
            ratio = f"{st['mean'] / ref:.2f}" if ref else "-"
            peak = ex.get("peak_extra_GiB", "")
            nm = b["name"].replace("test_", "")[:52]
            say(f"   {s[:34]:<34} {nm:<52} {fmt(st['mean']):>10} {fmt(st['median']):>10} {st['rounds']:>6} {ratio:>7} {peak!s:>8}")
    # the targets in bench/RESULTS.md
    by = {b["name"]: b["stats"]["mean"] for b in benches}
    if "test_k1_triton" in by:
        say(f"   target K1 <= 30 us at B=1024, L=4096 (CUDA): mean {fmt(by['test_k1_triton'])}")
    if "test_k2_triton" in by and "test_k2_memory_floor" in by:
        say(f"   target K2 <= 1.5x copy floor: {by['test_k2_triton'] / by['test_k2_memory_floor']:.2f}x "
            f"({fmt(by['test_k2_triton'])} vs {fmt(by['test_k2_memory_floor'])})")
else:
    say("== benchmarks: no results")
skipped = []
for log in [os.path.join(out, "bench.log")]:
    if os.path.exists(log):
        skipped = [l.strip() for l in open(log, errors="replace") if l.startswith("SKIPPED")]
if skipped:
    say("== benchmark skips")
    for l in skipped[:20]:
        say("   " + l[:200])
steps = os.path.join(work, "steps.txt")
if os.path.exists(steps):
    say("== steps (name, exit code, seconds, limit)")
    for l in open(steps).read().splitlines():
        rc = (l.split() + ["", ""])[1]
        say("   " + l + ("  <- cut at its time limit: partial results" if rc in ("124", "137") else ""))
text = "\n".join(lines) + "\n"
open(os.path.join(out, "summary.txt"), "w").write(text)
EOF

# run one step: name, time limit, log file, command...; records rc and seconds in steps.txt
step() {
  local name=$1 lim=$2 log=$3; shift 3
  if [ "$lim" -le 0 ]; then
    echo "$name skipped: no time left in DEVICE_BUDGET_S=$BUDGET" | tee -a "$log"
    echo "$name - 0 0 (no time left)" >> "$WORK/steps.txt"
    return
  fi
  echo "==================== $name (limit ${lim}s) $(date -u +%T)" | tee -a "$log"
  local t=$SECONDS
  timeout -s INT -k 15 "$lim" "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  echo "$name rc=$rc $(( SECONDS - t ))s limit=${lim}s" | tee -a "$log"
  echo "$name $rc $(( SECONDS - t )) $lim" >> "$WORK/steps.txt"
}
summarize() { "$PY" "$WORK/summary.py" "$OUT" "$WORK" >/dev/null 2>&1; }

# ------------------------------------------------------------------ (c) correctness tests
if want tests; then
  XDIST=""
  NW=${XDIST_WORKERS:-8}
  [ "$CUDA" = 1 ] && [ "$HAVE_XDIST" = 1 ] && [ "$NW" -gt 0 ] && XDIST="-n $NW"   # parallel Triton compiles
  step tests "$(limit 150 180)" "$OUT/tests.log" \
    "$PY" -m pytest tests/test_first_occurrence.py tests/test_advantages.py tests/test_pg_loss.py \
    -p no:cacheprovider -rfEs $XDIST $PYTEST_TIMEOUT --junitxml="$OUT/tests_junit.xml"
  summarize
fi
if want k3check; then
  step k3check "$(limit 50 150)" "$WORK/k3check.log" "$PY" "$WORK/k3check.py"
  cat "$WORK/k3check.log" >> "$OUT/tests.log"
  summarize
fi

# ------------------------------------------------------------------ (d) benchmarks
if [ "$HAVE_BENCH" = 1 ]; then
  BOPTS="-p no:cacheprovider --benchmark-only --benchmark-warmup=on --benchmark-warmup-iterations=3
         --benchmark-columns=min,median,mean,stddev,rounds $PYTEST_TIMEOUT -rs"
  K1K2_SEL="not nothing"
  K3_FAST="not liger and not compiled_eager"
  if [ "$CUDA" = 1 ]; then
    K1K2_SEL="not test_k1_reference_cpu_path"    # the trainer's CPU path: ~1024 row loops, seconds a call
    K3_FAST="$K3_FAST and not test_cpu_"         # CPU-path figures: not this machine's job
  fi
  if want k1k2; then
    step bench_k1k2 "$(limit 60 130)" "$OUT/bench.log" "$PY" -m pytest bench/test_bench_k1_k2.py $BOPTS \
      -k "$K1K2_SEL" --benchmark-json="$WORK/bench_k1k2.json"
    summarize
  fi
  if want k3; then
    step bench_k3 "$(limit 100 80)" "$OUT/bench.log" "$PY" -m pytest bench/test_bench_pg_loss.py $BOPTS \
      -k "$K3_FAST" --benchmark-json="$WORK/bench_k3.json"
    summarize
  fi
  if want liger; then
    step bench_k3_liger "$(limit 90 30)" "$OUT/bench.log" "$PY" -m pytest bench/test_bench_pg_loss.py $BOPTS \
      -k "liger" --benchmark-json="$WORK/bench_k3_liger.json"
    summarize
  fi
  if want compile; then
    step bench_k3_compile "$(limit 120 5)" "$OUT/bench.log" "$PY" -m pytest bench/test_bench_pg_loss.py $BOPTS \
      -k "compiled_eager" --benchmark-json="$WORK/bench_k3_compile.json"
  fi
else
  echo "pytest-benchmark is not importable: benchmarks skipped" | tee -a "$OUT/bench.log"
fi

# ------------------------------------------------------------------ (e) summary
summarize
tar -czf "$OUT/raw.tar.gz" -C "$WORK" --exclude=pyshim . 2>/dev/null
set +x
echo
echo "==================== SUMMARY ($(( SECONDS - T0 )) s; files in \$OUT: $(ls "$OUT" | tr '\n' ' '))"
cat "$OUT/summary.txt"
