#!/usr/bin/env bash
# The device check on a lent GPU (H100 / H200): a thin driver around bench/device_check/ (Python,
# linted and tested on CPU: tests/test_device_check.py).  `bash bench/device_check.sh --help`.
usage() {
  cat <<'EOF'
usage: OUT=<dir> bash bench/device_check.sh [--part kernels|trainer]   (from the repository root;
                                                                         carry .device_wheels)
       bash bench/device_check.sh --wheels   (once, on a machine with pip's registry: fills
                                              .device_wheels, ~6 MB, for the GPU image's CPython 3.12)
       bash bench/device_check.sh --help     (this text; runs nothing)

Two runs, one per part, each within one device command:
  --part kernels (the default; <= 540 s): the kernel correctness tests (compiled, not the
      interpreter), the K3 check on device tensors against the float64 reference, K1/K2 times on
      the device (CUDA events, graph replay) and the copy / bf16-product ceilings, the K1/K2 and
      K3 benchmarks (every variant, the matmul floor, eager), Liger's two losses, torch.compile.
  --part trainer (<= 300 s): one ZeRO-3 update on a random Qwen2 of Qwen2.5-0.5B's shape
      (padded vs packed micro-batches) and `tspo-fast train --config configs/tiny.yaml` for
      3 steps with the HF engine (vLLM cannot be carried to the GPU).
Each prints PASS / MISS per target last (summary.txt).  `PYTHONPATH=bench python -m device_check
plan` prints every step's time limit and the estimate it is sized from.

What a run does: $OUT/env.txt (date, nvidia-smi, Python / torch / triton, the installs); the
part's packages missing from the image installed offline from .device_wheels/ into a folder of
their own on PYTHONPATH (never into the environment; kernels: liger-kernel and the pytest
plugins; trainer: DeepSpeed with what the image lacks, and bm25s); the repository and bench/ on
PYTHONPATH (nothing is built); then `python -m device_check run --part PART`, which runs the
steps under their limits and writes, with env.txt, at most 7 files to $OUT (the device tool
brings back 8): kernels: tests.log, tests_junit.xml, bench.log, bench.json, summary.txt,
raw.tar.gz; trainer: trainer.log, summary.txt, raw.tar.gz.  Without CUDA it runs too (the K3
check in Triton's interpreter at small shapes, the update at tiny shapes, the trainer on CPU).

Environment: OUT (default /tmp/devout), DEVICE_WORK (default /tmp/devwork-PART), PYTHON
(default python3), DEVICE_BUDGET_S (the part's seconds; default 540 / 300), STEPS (a subset of
the part's steps: kernels: tests k3check kgraph k1k2 k3 liger compile; trainer: update train),
XDIST_WORKERS (test processes on CUDA, default 8, 0 = off), DEVICE_TIME_SCALE (every time limit
x this, default 1: for a dry run on a slow machine without CUDA, where the kernels run in Triton's
interpreter).
EOF
}
cd "$(dirname "$0")/.." || exit 1
WHEELS=.device_wheels
# what the GPU image lacks (its package list: the device notes), at the versions this repository
# is tested with; the pytest plugins are there already and are installed only where missing
KERNEL_PKGS="liger-kernel==0.8.5 pytest-benchmark pytest-timeout py-cpuinfo pytest-xdist execnet"
DS_PKGS="deepspeed==0.19.8 hjson==3.1.0 pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0
         typing-inspection==0.4.2 bm25s==0.3.16"
PART=kernels
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --wheels) PART=wheels ;;
    --part) PART=${2:-}; shift ;;
    --part=*) PART=${1#--part=} ;;
    *) echo "device_check.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done
case "$PART" in
  kernels) PKGS=$KERNEL_PKGS ;;
  trainer) PKGS=$DS_PKGS ;;
  wheels)
    # binary wheels for the image's CPython 3.12 on x86-64 Linux; DeepSpeed is an sdist on PyPI:
    # built here into a pure-Python wheel (no ops: the trainer uses torch's AdamW on the GPU)
    mkdir -p "$WHEELS"
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d "$WHEELS" $KERNEL_PKGS ${DS_PKGS/deepspeed==0.19.8/} || exit 1
    DS_BUILD_OPS=0 python3 -m pip wheel --no-deps --no-build-isolation -w "$WHEELS" deepspeed==0.19.8 || exit 1
    ls -la "$WHEELS"
    exit 0 ;;
  *) echo "device_check.sh: --part must be kernels or trainer, got '$PART' (see --help)" >&2; exit 2 ;;
esac

T0=$(date +%s)
OUT=${OUT:-/tmp/devout}
WORK=${DEVICE_WORK:-/tmp/devwork-$PART}
PY=${PYTHON:-python3}
rm -rf "$WORK"
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

{
  echo "== part $PART, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "== host"; uname -a; nproc; free -g 2>/dev/null | head -2
  echo "== nvidia-smi"; nvidia-smi 2>&1
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw \
    --format=csv 2>&1
  echo "== pip install (offline, missing packages only, one by one) from $WHEELS"
  if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    # into a folder of its own on PYTHONPATH: the image keeps its packages as they are
    SITE=/tmp/tspo_device_site
    rm -rf "$SITE"
    for req in $PKGS; do
      "$PY" -m pip show "${req%%==*}" >/dev/null 2>&1 && continue            # there already: left as it is
      "$PY" -m pip install -q --no-index --find-links "$WHEELS" --no-deps --no-compile \
        --disable-pip-version-check --target "$SITE" "$req" || echo "== $req: no wheel in $WHEELS, or it does not install"
    done
  else
    echo "no wheels in $WHEELS (make them with 'bash bench/device_check.sh --wheels' and carry the folder)"
  fi
} > "$OUT/env.txt" 2>&1
# the repository (tspo_kernels, tspo_fast) and bench/ (device_check, the benchmarks' helpers) import
# from here: nothing to build
if [ -n "${SITE:-}" ] && [ -d "$SITE" ]; then
  export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD:$PWD/bench${PYTHONPATH:+:$PYTHONPATH}
{ echo "== python"; "$PY" -m device_check env; echo "PYTHONPATH=$PYTHONPATH"; } >> "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
exec "$PY" -m device_check run --part "$PART" --out "$OUT" --work "$WORK" --t0 "$T0" \
  --xdist-workers "${XDIST_WORKERS:-8}" --time-scale "${DEVICE_TIME_SCALE:-1}" \
  ${DEVICE_BUDGET_S:+--budget "$DEVICE_BUDGET_S"} ${STEPS:+--steps "$STEPS"}
