"""Every Triton kernel configuration of tspo_kernels compiles for Hopper (sm_90a) and fits it.

The interpreter accepts code the compiler rejects (dot shapes, types, constexpr misuse) and
computes offsets in Python integers, so it can neither see register spills nor 32-bit address
overflow.  ``bench/kernel_resources.py`` compiles every configuration the launchers can choose
with Triton's bundled ptxas (no GPU needed) and reads the cubin and the TTGIR; this test runs it
and fails on a configuration that does not compile, spills registers, needs more shared memory
than an SM has, fits fewer CTAs per SM than the kernel's traffic model assumes (bench/RESULTS.md),
or forms an address offset as a 32-bit product of two run-time values.  The K3 row kernel's
option flags are compiled on and off by ``tests/test_pg_loss.py::test_kernel_compiles_for_hopper``.
"""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

from kernel_resources import ctas_per_sm, narrow_offsets  # noqa: E402  (bench/ on the path first)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    import triton.backends

    if "nvidia" not in triton.backends.backends:
        pytest.skip("this Triton build has no NVIDIA backend")
    out = tmp_path_factory.mktemp("resources") / "resources.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "kernel_resources.py"), "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=1200, cwd=ROOT)
    assert out.exists(), (proc.stdout[-3000:], proc.stderr[-3000:])
    return json.loads(out.read_text()), proc


def test_every_kernel_compiles_for_hopper(compiled):
    data, proc = compiled
    kernels = {r["kernel"].split(":")[1] for r in data["results"]}
    assert {"_first_occurrence_kernel", "_turn_table_kernel", "_token_adv_kernel", "_pg_rows_kernel",
            "_soft_grad_kernel", "_filtered_dh_kernel", "_filtered_dw_kernel", "_mm_acc_kernel"} <= kernels
    errors = [f"{r['kernel']} [{r['label']}]: {r['error']}" for r in data["results"] if r["error"]]
    assert not errors, errors


def test_no_spills_shared_memory_within_the_sm_and_occupancy_as_modelled(compiled):
    data, proc = compiled
    failed = [f"{r['kernel'].split(':')[1]} [{r['label']}]: {'; '.join(r['failures'])}"
              for r in data["results"] if r["failures"]]
    assert not failed, "\n".join(failed)
    assert proc.returncode == 0 and "all checks passed" in proc.stdout, proc.stdout[-3000:]


def test_tensor_core_products_use_wgmma(compiled):
    """The block-sparse products and the GEMM run on Hopper's tensor cores (16-bit operands)."""
    data, _ = compiled
    for r in data["results"]:
        name = r["kernel"].split(":")[1]
        if name in ("_filtered_dh_kernel", "_filtered_dw_kernel", "_mm_acc_kernel") and "fp32" not in r["label"]:
            assert r["wgmma"] > 0, (name, r["label"])


# --------------------------------------------------------------------------- the checks themselves
def test_occupancy_arithmetic():
    """sm_90: 64K registers allocated per warp in units of 256, 64 warps, 32 CTAs, 228 KiB."""
    assert ctas_per_sm(255, 4, 0)["ctas"] == 2            # the old K1: 255 registers at 4 warps
    assert ctas_per_sm(48, 4, 0)["ctas"] == 10
    assert ctas_per_sm(32, 4, 0)["ctas"] == 16             # then the warp limit
    assert ctas_per_sm(128, 8, 160 * 1024)["ctas"] == 1    # then shared memory
    assert ctas_per_sm(16, 1, 0)["ctas"] == 32             # then the CTA limit


_OLD_MM_ACC = """
    %rk_41 = arith.addi %rk_40, %rk : tensor<64xi32> loc(#loc81)
    %a_57 = tt.expand_dims %rk_41 {axis = 0 : i32} : tensor<64xi32> -> tensor<1x64xi32> loc(#loc88)
    %a_58 = tt.splat %s_ak : i32 -> tensor<1x64xi32> loc(#loc88)
    %a_59 = arith.muli %a_57, %a_58 : tensor<1x64xi32> loc(#loc88)
    %a_61 = tt.broadcast %a_59 : tensor<1x64xi32> -> tensor<128x64xi32> loc(#loc87)
    %a_62 = tt.addptr %a_60, %a_61 : tensor<128x64x!tt.ptr<bf16>>, tensor<128x64xi32> loc(#loc87)
    %rm = arith.muli %pm_7, %c128_i32 : i32 loc(#loc74)
    %c128_i32 = arith.constant 128 : i32 loc(#loc1)
    %b_1 = tt.addptr %b_0, %rm : !tt.ptr<bf16>, i32 loc(#loc94)
"""


def test_narrow_offsets_finds_a_32_bit_index_times_stride():
    """The TTGIR of the old ``_mm_acc_kernel`` (k * s_ak in int32, excerpt): the index-times-stride
    product is found; a product with a compile-time factor (pm * 128) is not."""
    found = narrow_offsets(_OLD_MM_ACC)
    assert len(found) == 1 and found[0].startswith("%a_59"), found
    assert narrow_offsets(_OLD_MM_ACC.replace("xi32>", "xi64>")) == []
