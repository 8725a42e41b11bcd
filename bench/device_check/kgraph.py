"""Device-side times of K1, K2 and K2's copy floor at the targets' shape (B = 1024, L = 4096),
without the host (``python -m device_check.kgraph``): CUDA events around many back-to-back calls
(``triton.testing.do_bench``) and CUDA-graph replay (``do_bench_cudagraph``: no launch overhead),
medians.  pytest-benchmark's figures are host wall-clock per call, each ending in a device sync.
Also the two ceilings of bench/RESULTS.md's traffic / FLOP model: a 1 GiB device-to-device copy
(bytes read + written) and an 8192^3 bf16 product on random data.

Prints ``KGRAPH name key=value ...`` lines (read by :func:`device_check.parse.key_values`); without
CUDA one line says so.
"""
from __future__ import annotations

import sys
from typing import Callable, Dict

import torch


def line(name: str, values: Dict[str, str]) -> str:
    return f"KGRAPH {name} " + " ".join(f"{k}={v}" for k, v in values.items())


def time_both(fn: Callable[[], object]) -> Dict[str, str]:
    """Median microseconds of ``fn`` by events and by graph replay (an error is reported, not raised)."""
    import triton.testing as tt

    fn()
    torch.cuda.synchronize()
    res = {}
    for mode, bench in (("events_us", lambda f: tt.do_bench(f, warmup=25, rep=100, return_mode="median")),
                        ("graph_us", lambda f: tt.do_bench_cudagraph(f, rep=100, return_mode="median"))):
        try:
            res[mode] = f"{bench(fn) * 1e3:.2f}"
        except Exception as exc:      # a call that cannot be captured: reported in its line
            res[mode] = f"error:{type(exc).__name__}"
    return res


def main() -> int:
    if not torch.cuda.is_available():
        print("KGRAPH skipped: no CUDA")
        return 0
    import triton.testing as tt
    from baselines import make_k1_inputs, make_k2_inputs  # bench/, on PYTHONPATH

    import tspo_kernels as tk

    B, L = 1024, 4096
    ids, turn, obs, packed, _ = make_k1_inputs(B, L, 8, 6, "cuda")
    R, ks, K, gid, turn2, mask2 = make_k2_inputs(B, L, 5, 5, "cuda")
    out = torch.empty(B, L, dtype=torch.float32, device="cuda")
    cases = {
        "k1": lambda: tk.first_occurrence(ids, turn, obs, packed, backend="triton"),
        # validate=False with max_turns: no read-back of num_turns (capturable); the benchmark validates
        "k2": lambda: tk.turn_advantages(R, ks, K, gid, turn2, mask2, backend="triton", max_turns=5, validate=False),
        "k2_copy_floor": lambda: torch.mul(turn2, mask2, out=out),
    }
    for name, fn in cases.items():
        print(line(name, time_both(fn)), flush=True)
    x = torch.randn(2 ** 28, device="cuda")
    y = torch.empty_like(x)
    t = tt.do_bench(lambda: y.copy_(x), warmup=25, rep=200, return_mode="median") * 1e-3
    print(line("ceiling_copy", {"TBps": f"{2 * x.numel() * 4 / t / 1e12:.3f}", "ms": f"{t * 1e3:.3f}"}), flush=True)
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t = tt.do_bench(lambda: a @ b, warmup=25, rep=200, return_mode="median") * 1e-3
    print(line("ceiling_bf16_mm", {"TFLOPs": f"{2 * 8192 ** 3 / t / 1e12:.1f}", "ms": f"{t * 1e3:.3f}"}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
