"""K1 (first occurrence) and K2 (turn advantages) vs PyTorch baselines and Python loops.

On CUDA: B = 1024 rows, L = 4096 tokens, 8 variants of 6 tokens (the targets in
bench/RESULTS.md).  On CPU: small shapes; the Triton kernels run in the interpreter there,
so their CPU times are not kernel speed.
"""
import pytest
import torch
from baselines import k1_python, k1_unfold, k2_grouped_ops, k2_python, make_k1_inputs, make_k2_inputs

import tspo_kernels as tk

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")
B, L = (1024, 4096) if CUDA else (32, 512)
NV, VL = 8, 6


def _sync(fn):
    def run():
        out = fn()
        if CUDA:
            torch.cuda.synchronize()
        return out
    return run


@pytest.fixture(scope="module")
def k1_inputs():
    return make_k1_inputs(B, L, NV, VL, DEV)


@pytest.fixture(scope="module")
def k2_inputs():
    return make_k2_inputs(B, L, 5, 5, DEV)


def _info(benchmark, name):
    benchmark.extra_info.update({"device": torch.cuda.get_device_name() if CUDA else "cpu", "B": B, "L": L,
                                 "impl": name})


def test_k1_triton(benchmark, k1_inputs):
    ids, turn, obs, packed, pats = k1_inputs
    want = k1_unfold(ids, turn, obs, pats)
    got = tk.first_occurrence(ids, turn, obs, packed, backend="triton")
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    _info(benchmark, "triton" + ("" if CUDA else " (interpreter)"))
    benchmark(_sync(lambda: tk.first_occurrence(ids, turn, obs, packed, backend="triton")))


def test_k1_torch_unfold(benchmark, k1_inputs):
    ids, turn, obs, packed, pats = k1_inputs
    _info(benchmark, "torch unfold")
    benchmark(_sync(lambda: k1_unfold(ids, turn, obs, pats)))


@pytest.mark.skipif(CUDA, reason="the Python loop takes minutes at the GPU shape")
def test_k1_python_loop(benchmark, k1_inputs):
    ids, turn, obs, packed, pats = k1_inputs
    _info(benchmark, "python loop")
    benchmark.pedantic(lambda: k1_python(ids, turn, obs, pats), rounds=1, iterations=1)


def test_k2_triton(benchmark, k2_inputs):
    want = k2_grouped_ops(*k2_inputs)
    got, _ = tk.turn_advantages(*k2_inputs, backend="triton", max_turns=5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    _info(benchmark, "triton" + ("" if CUDA else " (interpreter)"))
    benchmark(_sync(lambda: tk.turn_advantages(*k2_inputs, backend="triton", max_turns=5)))


def test_k2_torch_grouped_ops(benchmark, k2_inputs):
    _info(benchmark, "torch grouped ops")
    benchmark(_sync(lambda: k2_grouped_ops(*k2_inputs)))


@pytest.mark.skipif(CUDA, reason="the Python loop takes minutes at the GPU shape")
def test_k2_python_loop(benchmark, k2_inputs):
    _info(benchmark, "python loop")
    benchmark.pedantic(lambda: k2_python(*k2_inputs), rounds=1, iterations=1)


@pytest.mark.skipif(not CUDA, reason="memory traffic floor: CUDA only")
def test_k2_memory_floor(benchmark, k2_inputs):
    """Read the per-token inputs and write the (B, L) float32 output once: K2's floor."""
    R, ks, K, gid, turn, mask = k2_inputs
    out = torch.empty(turn.shape, dtype=torch.float32, device=DEV)
    _info(benchmark, "copy floor")
    benchmark(_sync(lambda: torch.mul(turn, mask, out=out)))


def test_k1_reference_cpu_path(benchmark, k1_inputs):
    """The PyTorch reference: what the trainer runs on CPU."""
    from tspo_kernels import reference
    ids, turn, obs, packed, pats = k1_inputs
    _info(benchmark, "reference (per-row unfold)")
    benchmark.pedantic(lambda: reference.first_occurrence(ids, turn, obs, packed), rounds=3, iterations=1)


def test_k2_reference_cpu_path(benchmark, k2_inputs):
    from tspo_kernels import reference
    _info(benchmark, "reference (float64)")
    benchmark.pedantic(lambda: reference.turn_advantages(*k2_inputs, max_turns=5), rounds=3, iterations=1)
