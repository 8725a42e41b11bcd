#!/usr/bin/env bash
# One-shot check of the Triton kernels (then a ZeRO-3 update and 3 trainer steps) on a lent GPU
# (H100 / H200), run from the repo root:
#
#     OUT=$OUT bash bench/device_check.sh          (carry: .device_wheels)
#
# and, once, on this machine before the call (needs pip's registry; the wheels are ignored by git):
#
#     bash bench/device_check.sh --wheels          (fills .device_wheels, ~6 MB, for the GPU
#                                                   image's Python 3.12; nothing else runs)
#
# (a) $OUT/env.txt: date, nvidia-smi, Python / torch / triton versions, the offline installs;
# (b) installs what the GPU image may lack from the carried wheels in .device_wheels/ into a
#     folder of its own on PYTHONPATH (only packages that are missing, one by one: liger-kernel,
#     the pytest plugins, DeepSpeed with the needs the image lacks: hjson, pydantic,
#     pydantic-core, annotated-types, typing-inspection, and bm25s for the trainer's retriever)
#     and makes `tspo_kernels` and `tspo_fast` importable (the repository root on PYTHONPATH,
#     nothing built);
# (c) the kernel correctness tests (tests/test_first_occurrence.py, test_advantages.py,
#     test_pg_loss.py) with TRITON_INTERPRET unset, so the compiled kernels run (tests/conftest.py
#     runs the CPU-built test inputs through the GPU: for K3 only the row kernel goes there), then
#     the K3 check on device tensors (k3check): large vocabularies (several BLOCK_V blocks per
#     row), the dense path's float32 weight-gradient accumulation by addmm.dtype_out and by the
#     Triton epilogue over several chunks, the gradient-filtered path (threshold 0 through the sparse
#     kernels and through the dense fallback, and 2^-12; float32
#     and bf16, random and LM-like inputs; its error bound; Triton against its PyTorch ops) and the
#     forward-only log-probs, each against the float64 reference;
# (d) kgraph: device-side times of K1, K2 and K2's copy floor (CUDA events, CUDA-graph replay)
#     and the two ceilings (a 1 GiB copy, an 8192^3 bf16 product); then the kernel benchmarks:
#     bench/test_bench_k1_k2.py, bench/test_bench_pg_loss.py (every K3 variant: dense with either
#     accumulation, filtered at 2^-12 / 0 (dense fallback and sparse) / 2^-8, log-probs; on uniform and LM-like inputs; the
#     matmul floor, one product, eager; then liger-kernel; then torch.compile last, it compiles
#     for a minute); the DeepSpeed / vLLM benchmarks (rollout, trainer, retrieval) are not run;
# (e) $OUT/summary.txt (and stdout, last): test counts, failures, the K3 check, per benchmark the
#     mean / median time, the K3 tables (ratio of every variant to the matmul floor on the same
#     inputs and to the dense path, peak memory, skipped fraction, chunk) and the target lines
#     (PASS / MISS): K3 dense <= 1.10x floor, log-probs <= 1.05x one product, filtered <= 0.75x
#     floor on LM-like inputs and not slower than dense on uniform ones, K1 <= 30 us, K2 <= 1.5x
#     its copy floor;
# (f) update, last (cut first when time runs short): one ZeRO-3 training update on a random
#     Qwen2 of Qwen2.5-0.5B's shape, padded vs packed micro-batches (bench/gpu_update_step.py,
#     `--small` without CUDA), if DeepSpeed imports; its JSON goes into summary.txt;
# (g) train: the trainer as users run it, `tspo-fast train --config configs/tiny.yaml` for 3 steps
#     with the HF engine (vLLM cannot be carried): ZeRO-3, multi-turn rollouts with in-process
#     BM25, K1 / K2 / K3 in the update, weight sync; each step's time breakdown into summary.txt.
#
# Every step has its own time limit, cut to what is left of DEVICE_BUDGET_S (default 340 s),
# so the whole script ends within about that (+ ~15 s); when time runs short the last steps
# (train, update, compile, liger) are cut first.  A step at its limit gets SIGINT, so pytest
# still writes the junit / benchmark JSON of what finished.  STEPS (default "tests k3check kgraph
# k1k2 k3 liger compile update train") picks steps for a rerun (STEPS="update train": the trainer
# parts, about 3 min);
# XDIST_WORKERS (default 8, 0 = off) sets the test processes on CUDA.  No `set -e`: a failed
# step does not stop the later ones.  Without CUDA the script still runs (k3check in Triton's
# interpreter at small shapes, kgraph reports "no CUDA", update runs `--small`).
# $OUT receives at most 7 files (the device tool brings back 8): env.txt, tests.log,
# tests_junit.xml, bench.log, bench.json, summary.txt, raw.tar.gz (the work folder's logs).
cd "$(dirname "$0")/.." || exit 1
WHEELS=.device_wheels
# what the GPU image lacks (its package list: the device notes), at the versions this repository
# is tested with; the pytest plugins are there already and are installed only where missing
KERNEL_PKGS="liger-kernel==0.8.5 pytest-benchmark pytest-timeout py-cpuinfo pytest-xdist execnet"
DS_PKGS="deepspeed==0.19.8 hjson==3.1.0 pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0
         typing-inspection==0.4.2 bm25s==0.3.16"
if [ "${1:-}" = "--wheels" ]; then
  # binary wheels for the image's CPython 3.12 on x86-64 Linux; DeepSpeed is an sdist on PyPI:
  # built here into a pure-Python wheel (no ops: the trainer uses torch's AdamW on the GPU)
  mkdir -p "$WHEELS"
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$WHEELS" $KERNEL_PKGS ${DS_PKGS/deepspeed==0.19.8/} || exit 1
  DS_BUILD_OPS=0 python3 -m pip wheel --no-deps --no-build-isolation -w "$WHEELS" deepspeed==0.19.8 || exit 1
  ls -la "$WHEELS"
  exit 0
fi
set -x
OUT=${OUT:-/tmp/devout}
mkdir -p "$OUT"
WORK=${DEVICE_WORK:-/tmp/devwork}
rm -rf "$WORK"
mkdir -p "$WORK"
PY=${PYTHON:-python3}
BUDGET=${DEVICE_BUDGET_S:-340}
STEPS=${STEPS:-"tests k3check kgraph k1k2 k3 liger compile update train"}
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
{
  echo "== pip install (offline, missing packages only, one by one) from $WHEELS"
  ls -la "$WHEELS" 2>&1
  if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    # into a folder of its own on PYTHONPATH, never into the environment: the image (or a
    # workstation running this script) keeps its packages as they are
    SITE=/tmp/tspo_device_site
    rm -rf "$SITE"
    for req in $KERNEL_PKGS $DS_PKGS; do
      "$PY" -m pip show "${req%%==*}" >/dev/null 2>&1 && continue      # there already: left as it is
      "$PY" -m pip install -q --no-index --find-links "$WHEELS" --no-deps --no-compile \
        --disable-pip-version-check --target "$SITE" "$req" \
        || echo "== $req: no wheel in $WHEELS, or it does not install here"
    done
    [ -d "$SITE" ] && export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
  else
    echo "no wheels in $WHEELS (make them with 'bash bench/device_check.sh --wheels' and carry the folder)"
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
    """output -> (error, tolerance), judged as tests/test_pg_loss.py judges them."""
    return {k: (float("inf"), T.TOL[dtype]) if not torch.isfinite(got[k]).all() else T.error_of(k, got, want, dtype)
            for k in T.outputs_of(want)}


passed = failed = 0


def verdict(name, errs, extra_ok=True, note=""):
    """errs: output -> (error, tolerance), from errors()."""
    global passed, failed
    worst = max(errs, key=lambda k: errs[k][0] / errs[k][1])
    ok = all(e <= tol for e, tol in errs.values()) and bool(extra_ok)
    print(f"{'PASS' if ok else 'FAIL'} {name}: worst {worst} rel err {errs[worst][0]:.2e} "
          f"(tol {errs[worst][1]:.1e}){note}")
    if not ok:
        print("    all:", {k: f"{e:.2e} (tol {tol:.1e})" for k, (e, tol) in errs.items()})
    passed, failed = passed + ok, failed + (not ok)


for i, (opts, dtype, N, H, V, chunk) in enumerate(CASES):
    name = f"pg_loss {opts} {str(dtype).split('.')[-1]} N={N} H={H} V={V} chunk={chunk}"
    try:
        t = time.time()
        args, kw = T.make_case(500 + i, N, H, V, dtype, opts=T.OPTION_SETS[opts])
        got = T.run(fused_linear_pg_loss, tuple(on(a) for a in args), {k: on(v) for k, v in kw.items()},
                    chunk_size=chunk, backend="triton")
        got = {k: v.cpu() for k, v in got.items()}
        verdict(name, errors(got, T.reference_of(args, kw), dtype), note=f" [{time.time() - t:.1f} s]")
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

# ---------------------------------------------------------------- every K3 variant on device tensors
# tests/test_pg_loss.py's CUDA runs send only the row kernel to the GPU (tests/conftest.py): the
# products, the float32 weight-gradient accumulation and the filtered path run here only.
sys.path.insert(0, "bench")
from lm_like import make_lm_like_inputs  # noqa: E402
from tspo_kernels import pg_loss as PG  # noqa: E402


def guarded(name, fn):
    global failed
    t = time.time()
    try:
        fn()
    except Exception as exc:  # noqa: BLE001
        failed += 1
        print(f"FAIL {name}: {type(exc).__name__}: {str(exc)[:500]}")
    print(f"    [{name}: {time.time() - t:.1f} s]")


# (1) dense path, bf16 over several chunks: the float32 weight-gradient accumulation, each strategy
def dense_acc(strategy):
    N, H, V, chunk = (256, 64, 40000, 64) if CUDA else (40, 16, 300, 16)
    name = f"pg_loss dense acc={strategy} bfloat16 N={N} H={H} V={V} chunk={chunk}"
    if strategy == "dtype_out" and not (CUDA and PG._dtype_out_ok(dev, bf16)):
        print(f"NOTE {name}: aten::addmm.dtype_out unavailable here ({'no CUDA' if not CUDA else 'this torch'}); "
              "the dense path falls back to the Triton epilogue")
        return
    args, kw = T.make_case(701, N, H, V, bf16, opts=T.OPTION_SETS["all"])
    before = PG._ACC_OVERRIDE
    PG._ACC_OVERRIDE = strategy
    try:
        used = PG._acc_strategy(dev, bf16)
        got = T.run(fused_linear_pg_loss, tuple(on(a) for a in args), {k: on(v) for k, v in kw.items()},
                    chunk_size=chunk, backend="triton")
    finally:
        PG._ACC_OVERRIDE = before
    got = {k: v.cpu() for k, v in got.items()}
    verdict(name, errors(got, T.reference_of(args, kw), bf16), used == strategy, f" [strategy {used}]")


for strategy in ("dtype_out", "triton"):
    guarded(f"dense acc={strategy}", lambda: dense_acc(strategy))


# (2) filtered path: threshold 0 (keeps every tile: the dense result; through the sparse kernels and
# through the dense fallback of filter_dense_above) and 2^-12 (the default), on
# make_case's random inputs (bias, temperature, entropy and KL terms: every branch of the bound)
# and on LM-like inputs (bench/lm_like.py), float32 and bf16, Triton against the float64 reference
REFS = {}


def filtered_case(kind, dtype, thr, dense_above=0.75):
    if kind == "random":
        N, H, V, chunk = (256, 64, 40000, 128) if CUDA else (40, 16, 300, 16)
        args, kw = T.make_case(811, N, H, V, dtype, opts=T.OPTION_SETS["all"])
    else:
        N, H, V, chunk = (512, 512, 32768, None) if CUDA else (64, 16, 512, 32)
        h, w, y, old, adv, mask = make_lm_like_inputs(N, H, V, dtype, "cpu", seed=5)
        args, kw = (h.detach(), w.detach(), y, old, adv, mask), {}
    dn = str(dtype).split(".")[-1]
    name = f"pg_loss filtered {kind} {dn} threshold={thr:g} dense_above={dense_above:g} N={N} H={H} V={V} chunk={chunk}"
    stats = {}
    dargs, dkw = tuple(on(a) for a in args), {k: on(v) for k, v in kw.items()}
    got = T.run(fused_linear_pg_loss, dargs, dkw, chunk_size=chunk, backend="triton", backward="filtered",
                filter_threshold=thr, filter_stats=stats, filter_dense_above=dense_above)
    got = {k: v.cpu() for k, v in got.items()}
    dense = {k: v.cpu() for k, v in T.run(fused_linear_pg_loss, dargs, dkw, chunk_size=chunk,
                                          backend="triton").items()}
    if (kind, dtype) not in REFS:                 # the float64 reference, once per inputs
        REFS[(kind, dtype)] = T.reference_of(args, kw)
    ref = REFS[(kind, dtype)]
    skipped = float(stats["skipped_fraction"])
    ok = skipped == 0.0 if thr == 0.0 else (skipped > 0.0 or kind == "random" or not CUDA)
    note = (f" [skipped {skipped:.3f}: dh {float(stats['skipped_dh']):.3f}, dw {float(stats['skipped_dw']):.3f};"
            f" dense chunks {stats['dense_chunks']}/{stats['chunks']}]")
    if thr == 0.0:                                # every chunk keeps all: dense products unless told never
        ok = ok and stats["dense_chunks"] == (stats["chunks"] if dense_above < 1.0 else 0)
    if dtype == f32:   # the error bound: sum|filtered - dense| <= dropped bound x largest row 1-norm
        w64, h64, m = args[1].double(), args[0].double(), args[5] != 0
        for g, bound in (("grad_hidden", float(stats["dropped_l1_bound_dh"]) * float(w64.abs().sum(1).max())),
                         ("grad_weight", float(stats["dropped_l1_bound_dw"]) * float(h64[m].abs().sum(1).max()))):
            err = float((got[g].double() - dense[g].double()).abs().sum())
            slack = 1e-4 * float(dense[g].double().abs().sum())          # float32 rounding of two products
            ok = ok and err <= bound + slack
            note += f" [{g}: |filtered - dense|_1 {err:.2e} <= bound {bound:.2e} + {slack:.1e}]"
    want = ref
    if kind == "lm_like" and dtype != f32:
        # LM-like logits reach |z| ~ 20-50 (bench/lm_like.py): bf16 logits alone put the dense path
        # near the bf16 tolerance of the float64 reference, so the filter is judged against it
        de = errors(dense, ref, dtype)
        note += f" [vs the dense bf16 path; dense vs float64: worst {max(e for e, _ in de.values()):.2e}]"
        want = dict({k: v.double() for k, v in dense.items()}, loss_scale=ref["loss_scale"])
    verdict(name, errors(got, want, dtype), ok, note)


for kind in ("random", "lm_like"):
    for dtype in (f32, bf16):
        # threshold 0 through the block-sparse kernels over every tile (dense_above 1), and the default
        for thr, da in ((0.0, 1.0), (2.0 ** -12, 0.75)):
            guarded(f"filtered {kind} {dtype} {thr} {da}", lambda: filtered_case(kind, dtype, thr, da))
for dtype in (f32, bf16):   # threshold 0 with the default dense_above: the chunks fall back to dense products
    guarded(f"filtered random {dtype} 0 fallback", lambda: filtered_case("random", dtype, 0.0, 0.75))


# (3) the filtered path's Triton kernels against its PyTorch ops on the same device tensors (same plan)
def filtered_backends():
    N, H, V = (512, 128, 32768) if CUDA else (64, 16, 512)
    h, w, y, old, adv, mask = make_lm_like_inputs(N, H, V, f32, "cpu", seed=6)
    args = tuple(on(a) for a in (h.detach(), w.detach(), y, old, adv, mask))
    runs = {}
    for backend in ("torch", "triton"):
        runs[backend] = {k: v.cpu() for k, v in T.run(fused_linear_pg_loss, args, {}, backend=backend,
                                                      backward="filtered").items()}
    errs = {k: (T.rel(runs["triton"][k], runs["torch"][k]), 1e-4) for k in ("grad_hidden", "grad_weight", "logp", "loss")}
    verdict(f"pg_loss filtered LM-like float32 N={N} H={H} V={V}: Triton vs PyTorch backend", errs)


guarded("filtered backends", filtered_backends)

print(f"k3check ({'CUDA, compiled' if CUDA else 'CPU, interpreter'}): {passed} passed, {failed} failed")
sys.exit(1 if failed else 0)
EOF

cat > "$WORK/kgraph.py" <<'EOF'
"""Device-side times of K1, K2 and K2's copy floor at the targets' shape (B = 1024, L = 4096),
without the host: CUDA events around many back-to-back calls (triton.testing.do_bench) and
CUDA-graph replay (do_bench_cudagraph: no launch overhead), medians.  pytest-benchmark's
figures are host wall-clock per call, each ending in a device sync.  Also the two ceilings of
the traffic / FLOP model in bench/RESULTS.md: a 1 GiB device-to-device copy (bytes read +
written) and an 8192^3 bf16 matrix product on random data.  Prints "KGRAPH name key=value" lines."""
import sys

import torch

if not torch.cuda.is_available():
    print("KGRAPH skipped: no CUDA")
    sys.exit(0)
import triton.testing as tt  # noqa: E402

sys.path.insert(0, "bench")
import tspo_kernels as tk  # noqa: E402
from baselines import make_k1_inputs, make_k2_inputs  # noqa: E402

B, L = 1024, 4096
ids, turn, obs, packed, pats = make_k1_inputs(B, L, 8, 6, "cuda")
R, ks, K, gid, turn2, mask2 = make_k2_inputs(B, L, 5, 5, "cuda")
out = torch.empty(B, L, dtype=torch.float32, device="cuda")
x = torch.randn(2 ** 28, device="cuda")
y = torch.empty_like(x)
a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
cases = {
    "k1": lambda: tk.first_occurrence(ids, turn, obs, packed, backend="triton"),
    # validate=False with max_turns: no read-back of num_turns (capturable); the benchmark validates
    "k2": lambda: tk.turn_advantages(R, ks, K, gid, turn2, mask2, backend="triton", max_turns=5, validate=False),
    "k2_copy_floor": lambda: torch.mul(turn2, mask2, out=out),
}
for name, fn in cases.items():
    fn()
    torch.cuda.synchronize()
    res = {}
    for mode, bench in (("events_us", lambda f: tt.do_bench(f, warmup=25, rep=100, return_mode="median")),
                        ("graph_us", lambda f: tt.do_bench_cudagraph(f, rep=100, return_mode="median"))):
        try:
            res[mode] = f"{bench(fn) * 1e3:.2f}"
        except Exception as exc:  # noqa: BLE001
            res[mode] = f"error:{type(exc).__name__}"
    print(f"KGRAPH {name} " + " ".join(f"{k}={v}" for k, v in res.items()), flush=True)
t = tt.do_bench(lambda: y.copy_(x), warmup=25, rep=200, return_mode="median") * 1e-3
print(f"KGRAPH ceiling_copy TBps={2 * x.numel() * 4 / t / 1e12:.3f} ms={t * 1e3:.3f}", flush=True)
t = tt.do_bench(lambda: a @ b, warmup=25, rep=200, return_mode="median") * 1e-3
print(f"KGRAPH ceiling_bf16_mm TFLOPs={2 * 8192 ** 3 / t / 1e12:.1f} ms={t * 1e3:.3f}", flush=True)
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
        if l.startswith(("PASS", "FAIL", "NOTE", "k3check", "    all")) or "Error" in l:
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
    """(comparison set, is-ours) for a benchmark outside the K3 CUDA tables."""
    name, ex = b["name"], b.get("extra_info", {})
    impl = ex.get("impl") or (b.get("params") or {}).get("impl", "")
    if name.startswith("test_k1_"):
        return "K1 first occurrence", name == "test_k1_triton"
    if name.startswith("test_k2_"):
        return "K2 turn advantages", name == "test_k2_triton"
    group = b.get("group") or "k3"
    if group.startswith("k3-cpu"):
        return f"{group} (CPU)", impl == "fused_torch_path"
    return group, False


def impl_of(b):
    return b.get("extra_info", {}).get("impl") or (b.get("params") or {}).get("impl", "")


def is_k3_cuda(b):
    return (b.get("group") or "").startswith(("k3-cuda-fwd-bwd", "k3-cuda-logprobs"))


def verdict(ok):
    return "PASS" if ok else "MISS"


kg = {}
kg_log = os.path.join(work, "kgraph.log")
if os.path.exists(kg_log):
    for l in open(kg_log, errors="replace"):
        if l.startswith("KGRAPH "):
            parts = l.split()
            if len(parts) >= 3 and "=" in parts[2]:
                kg[parts[1]] = dict(p.split("=", 1) for p in parts[2:] if "=" in p)


def kg_us(name, mode):
    try:
        return float(kg[name][mode]) * 1e-6
    except (KeyError, ValueError):
        return None


other = [b for b in benches if not is_k3_cuda(b)]
k3 = [b for b in benches if is_k3_cuda(b)]
if other:
    sets = {}
    for b in other:
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

# ---------------------------------------------------------------- K3 on CUDA: every variant against its floor
fwd = [b for b in k3 if (b.get("group") or "").startswith("k3-cuda-fwd-bwd")]
lpb = [b for b in k3 if (b.get("group") or "").startswith("k3-cuda-logprobs")]


def find(items, N, impl, inputs="uniform"):
    for b in items:
        ex = b.get("extra_info", {})
        if ex.get("N") == N and impl_of(b) == impl and ex.get("inputs", "uniform") == inputs:
            return b["stats"]["median"]
    return None


def ratio(a, b):
    return a / b if a is not None and b else None


def rtxt(r):
    return "-" if r is None else f"{r:.2f}x"


def skipped_of(items, N, impl, inputs):
    for b in items:
        ex = b.get("extra_info", {})
        if ex.get("N") == N and impl_of(b) == impl and ex.get("inputs") == inputs:
            return ex.get("skipped_fraction")
    return None


Ns = sorted({b.get("extra_info", {}).get("N") for b in k3 if b.get("extra_info", {}).get("N")})
for N in Ns:
    rows = [b for b in fwd if b.get("extra_info", {}).get("N") == N]
    if rows:
        say(f"== K3 forward + backward, bf16, H=3584, V=152064, N={N} (medians; x floor = / the matmul floor's median "
            "on the same inputs; x dense = / tspo_dense's on the same inputs)")
        say(f"   {'inputs':<8} {'variant':<26} {'mean':>10} {'median':>10} {'rnd':>3} {'x floor':>7} {'x dense':>7} "
            f"{'peak GiB':>8} {'skipped':>7} {'chunk':>11} acc")
        for b in sorted(rows, key=lambda b: (b.get("extra_info", {}).get("inputs", ""), b["stats"]["median"])):
            st, ex = b["stats"], b.get("extra_info", {})
            inp = ex.get("inputs", "uniform")
            fl = find(fwd, N, "matmul_floor", inp) or find(fwd, N, "matmul_floor")
            dn = find(fwd, N, "tspo_dense", inp)
            sk = ex.get("skipped_fraction")
            ch = f"{ex['chunk_rows']} x{ex['chunks']}" if "chunk_rows" in ex else "-"
            say(f"   {inp:<8} {impl_of(b)[:26]:<26} {fmt(st['mean']):>10} {fmt(st['median']):>10} {st['rounds']:>3} "
                f"{rtxt(ratio(st['median'], fl)):>7} {rtxt(ratio(st['median'], dn)):>7} "
                f"{ex.get('peak_extra_GiB', '-')!s:>8} {'-' if sk is None else f'{sk:.3f}':>7} {ch:>11} "
                f"{ex.get('acc_strategy', '')}")
            if "entropy_median" in ex and impl_of(b) == "matmul_floor":
                say(f"   {'':<8} (LM-like inputs as measured: entropy median {ex['entropy_median']} nats, "
                    f"top-1 median {ex.get('top1_median')})")
    rows = [b for b in lpb if b.get("extra_info", {}).get("N") == N]
    if rows:
        one = find(lpb, N, "one_product")
        say(f"== K3 forward-only log-probs, N={N} (x one product = median / one h W^T product's median)")
        for b in sorted(rows, key=lambda b: b["stats"]["median"]):
            st, ex = b["stats"], b.get("extra_info", {})
            ch = f"chunk {ex['chunk_rows']} x{ex['chunks']}" if "chunk_rows" in ex else ""
            say(f"   {impl_of(b):<26} {fmt(st['mean']):>10} {fmt(st['median']):>10} {st['rounds']:>3} "
                f"{rtxt(ratio(st['median'], one)):>7}  peak {ex.get('peak_extra_GiB', '-')} GiB {ch}")

# ---------------------------------------------------------------- targets (bench/RESULTS.md)
say("== targets (medians; PASS / MISS as measured here; '-' = not measured in this run)")


def per_n(fn):
    parts, oks = [], []
    for N in Ns:
        txt, ok = fn(N)
        if txt is not None:
            parts.append(f"N={N}: {txt}")
            oks.append(ok)
    if not parts:
        return "-", None
    return "; ".join(parts), all(oks)


def line(label, fn):
    txt, ok = per_n(fn)
    say(f"   [{'----' if ok is None else verdict(ok)}] {label}: {txt}")


def vs(impl, inputs, ref_impl, ref_inputs, limit, show_skip=False):
    def f(N):
        r = ratio(find(fwd, N, impl, inputs), find(fwd, N, ref_impl, ref_inputs))
        if r is None:
            return None, None
        sk = skipped_of(fwd, N, impl, inputs) if show_skip else None
        return rtxt(r) + ("" if sk is None else f" (skipped {sk:.3f})"), r <= limit
    return f


if fwd or lpb:
    line("K3 dense fwd+bwd <= 1.10x matmul floor (uniform inputs, addmm.dtype_out accumulation)",
         vs("tspo_dense", "uniform", "matmul_floor", "uniform", 1.10))
    line("   same target, Triton-epilogue accumulation", vs("tspo_dense_triton_acc", "uniform", "matmul_floor",
                                                             "uniform", 1.10))
    line("   same target, LM-like inputs", vs("tspo_dense", "lm_like", "matmul_floor", "lm_like", 1.10))

    def lp(N):
        r = ratio(find(lpb, N, "tspo_logprobs"), find(lpb, N, "one_product"))
        return (None, None) if r is None else (rtxt(r), r <= 1.05)
    line("K3 forward log-probs <= 1.05x one product", lp)
    line("K3 filtered <= 0.75x matmul floor on LM-like inputs (threshold 2^-12)",
         vs("tspo_filtered", "lm_like", "matmul_floor", "lm_like", 0.75, True))
    line("   threshold 2^-8 (same target)", vs("tspo_filtered_t8", "lm_like", "matmul_floor", "lm_like", 0.75, True))
    line("K3 filtered never slower than dense on uniform inputs (threshold 2^-12; x dense)",
         vs("tspo_filtered", "uniform", "tspo_dense", "uniform", 1.0, True))
    line("   worst case: threshold 0, nothing skipped, dense fallback (x dense)",
         vs("tspo_filtered_noskip", "uniform", "tspo_dense", "uniform", 1.0, True))
    line("   threshold 0 through the sparse kernels, no fallback (x dense; the model predicts 1.26-1.33x)",
         vs("tspo_filtered_noskip_sparse", "uniform", "tspo_dense", "uniform", 1.35, True))
by = {b["name"]: b["stats"]["median"] for b in benches}
k1w, k1g, k1e = by.get("test_k1_triton"), kg_us("k1", "graph_us"), kg_us("k1", "events_us")
if k1w or k1g:
    ok = (k1w or k1g) <= 30e-6
    say(f"   [{verdict(ok)}] K1 <= 30 us at B=1024, L=4096 (verdict on the wall-clock median when measured): "
        f"wall-clock (pytest-benchmark, call + sync) {fmt(k1w)}; device: CUDA-graph replay {fmt(k1g)}, "
        f"events {fmt(k1e)}")
else:
    say("   [----] K1 <= 30 us at B=1024, L=4096: -")
k2w, k2f = by.get("test_k2_triton"), by.get("test_k2_memory_floor")
k2g, k2fg = kg_us("k2", "graph_us"), kg_us("k2_copy_floor", "graph_us")
rw, rg = ratio(k2w, k2f), ratio(k2g, k2fg)
if rw or rg:
    ok = (rw or rg) <= 1.5
    say(f"   [{verdict(ok)}] K2 <= 1.5x its copy floor (verdict on the wall-clock medians when measured): "
        f"wall-clock {rtxt(rw)} ({fmt(k2w)} vs {fmt(k2f)}; validate=True reads num_turns back); CUDA-graph replay "
        f"{rtxt(rg)} ({fmt(k2g)} vs {fmt(k2fg)}; validate=False, max_turns=5)")
else:
    say("   [----] K2 <= 1.5x its copy floor: -")
if "ceiling_copy" in kg or "ceiling_bf16_mm" in kg:
    say(f"   ceilings measured here: device-to-device copy {kg.get('ceiling_copy', {}).get('TBps', '-')} TB/s "
        f"(read + write), 8192^3 bf16 product {kg.get('ceiling_bf16_mm', {}).get('TFLOPs', '-')} TFLOP/s "
        "(the model in bench/RESULTS.md assumes 4.3 and 790)")
if not benches:
    say("== benchmarks: no results")
skipped = []
for log in [os.path.join(out, "bench.log")]:
    if os.path.exists(log):
        skipped = [l.strip() for l in open(log, errors="replace") if l.startswith("SKIPPED")]
if skipped:
    say("== benchmark skips")
    for l in skipped[:20]:
        say("   " + l[:200])
upd = os.path.join(work, "update_step.json")
if os.path.exists(upd):
    try:
        u = json.load(open(upd))
        say(f"== ZeRO-3 update (bench/gpu_update_step.py): {u.get('device')}, {u.get('rows')} rows, "
            f"{u.get('tokens')} tokens")
        for m, r in u.get("modes", {}).items():
            say(f"   {m:11s} log-probs {fmt(r.get('logprobs_s'))}  update {fmt(r.get('update_s'))}  "
                f"{r.get('tokens_per_s', 0):.0f} tokens/s  padding {r.get('padding_frac', 0):.2f}  "
                f"peak {r.get('peak_gib')} GiB  micro-batches {r.get('micro_batches')}")
        a, b = u.get("modes", {}).get("padded+old"), u.get("modes", {}).get("packed")
        if a and b:
            say(f"   packed / padded+old, log-prob + update phases: "
                f"{(a['logprobs_s'] + a['update_s']) / (b['logprobs_s'] + b['update_s']):.2f}x faster")
    except (OSError, ValueError, KeyError, TypeError) as e:
        say(f"== ZeRO-3 update: unreadable result ({e})")
tm = os.path.join(work, "train_run", "metrics.jsonl")
if os.path.exists(tm):
    recs = []
    for l in open(tm):
        try:
            recs.append(json.loads(l))
        except ValueError:                  # a line cut by the step's time limit
            pass
    say(f"== trainer (tspo-fast train, configs/tiny.yaml, HF engine): {len(recs)} records")
    for r in recs:
        if "time/step" in r:
            parts = "  ".join(f"{k[5:]} {fmt(v)}" for k, v in r.items() if k.startswith("time/") and k != "time/step")
            say(f"   step {r.get('step')}: {fmt(r['time/step'])} ({parts}); "
                f"{r.get('train/tokens_per_s', 0):.0f} tokens/s, reward {r.get('reward/mean')}")
        if "eval/em" in r:
            say(f"   eval at step {r.get('step')}: EM {r['eval/em']}")
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
  step tests "$(limit 150 190)" "$OUT/tests.log" \
    "$PY" -m pytest tests/test_first_occurrence.py tests/test_advantages.py tests/test_pg_loss.py \
    -p no:cacheprovider -rfEs $XDIST $PYTEST_TIMEOUT --junitxml="$OUT/tests_junit.xml"
  summarize
fi
if want k3check; then
  step k3check "$(limit 90 140)" "$WORK/k3check.log" "$PY" "$WORK/k3check.py"
  cat "$WORK/k3check.log" >> "$OUT/tests.log"
  summarize
fi
if want kgraph; then
  step kgraph "$(limit 30 120)" "$WORK/kgraph.log" "$PY" "$WORK/kgraph.py"
  cat "$WORK/kgraph.log" >> "$OUT/bench.log"
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
    step bench_k1k2 "$(limit 50 110)" "$OUT/bench.log" "$PY" -m pytest bench/test_bench_k1_k2.py $BOPTS \
      -k "$K1K2_SEL" --benchmark-json="$WORK/bench_k1k2.json"
    summarize
  fi
  if want k3; then
    step bench_k3 "$(limit 130 45)" "$OUT/bench.log" "$PY" -m pytest bench/test_bench_pg_loss.py $BOPTS \
      -k "$K3_FAST" --benchmark-json="$WORK/bench_k3.json"
    summarize
  fi
  if want liger; then
    step bench_k3_liger "$(limit 60 25)" "$OUT/bench.log" "$PY" -m pytest bench/test_bench_pg_loss.py $BOPTS \
      -k "liger" --benchmark-json="$WORK/bench_k3_liger.json"
    summarize
  fi
  if want compile; then
    step bench_k3_compile "$(limit 90 5)" "$OUT/bench.log" "$PY" -m pytest bench/test_bench_pg_loss.py $BOPTS \
      -k "compiled_eager" --benchmark-json="$WORK/bench_k3_compile.json"
  fi
else
  echo "pytest-benchmark is not importable: benchmarks skipped" | tee -a "$OUT/bench.log"
fi

# ------------------------------------------------------------------ (f) a ZeRO-3 training update
if want update; then
  if "$PY" -c "import deepspeed" >/dev/null 2>&1; then
    SMALL=""
    [ "$CUDA" = 1 ] || SMALL="--small"
    step update "$(limit 120 5)" "$WORK/update.log" "$PY" bench/gpu_update_step.py $SMALL --rounds 2 \
      --out "$WORK/update_step.json" --work /tmp/tspo_update_model     # the model (GBs) stays out of raw.tar.gz
  else
    echo "update skipped: deepspeed does not import (carry .device_wheels)" | tee -a "$WORK/update.log"
    echo "update - 0 0 (deepspeed does not import)" >> "$WORK/steps.txt"
  fi
fi

# ------------------------------------------------------------------ (g) the trainer, 3 steps
if want train; then
  if "$PY" -c "import deepspeed, bm25s" >/dev/null 2>&1; then
    step train "$(limit 150 5)" "$WORK/train.log" "$PY" -m tspo_fast.cli train --config configs/tiny.yaml \
      --set rollout.engine=hf --set train.total_steps=3 --set train.eval_every=3 --set data.eval_limit=20 \
      --set train.checkpoint_every=0 --set output_dir="$WORK/train_run"
  else
    echo "train skipped: deepspeed or bm25s does not import (carry .device_wheels)" | tee -a "$WORK/train.log"
    echo "train - 0 0 (deepspeed or bm25s does not import)" >> "$WORK/steps.txt"
  fi
fi

# ------------------------------------------------------------------ (e) summary
summarize
tar -czf "$OUT/raw.tar.gz" -C "$WORK" --exclude=pyshim --exclude=checkpoints . 2>/dev/null   # the trainer's final checkpoint: MBs
set +x
echo
echo "==================== SUMMARY ($(( SECONDS - T0 )) s; files in \$OUT: $(ls "$OUT" | tr '\n' ' '))"
cat "$OUT/summary.txt"
