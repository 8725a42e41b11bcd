"""Every Triton kernel of tspo_kernels compiles for sm_90 (Hopper) with the launch configuration
the CUDA path uses.  The interpreter accepts code the compiler rejects (dot shapes, types,
constexpr misuse); this compiles with Triton's bundled ptxas, no GPU needed.  The K3 row
kernel's own check is ``tests/test_pg_loss.py::test_kernel_compiles_for_hopper``."""
import os
import subprocess
import sys

import pytest

_SCRIPT = r"""
import os, sys
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from importlib import import_module
# the package exports functions named like the modules: take the modules themselves
k1, k2, k3 = (import_module(f"tspo_kernels.{m}") for m in ("first_occurrence", "advantages", "pg_loss"))

def compile_(kernel, types, const, num_warps=4, num_stages=3):
    sig = {}
    for name in kernel.arg_names:
        if name in const:
            sig[name] = "constexpr"
        else:
            sig[name] = types.get(name, "i32")
    cx = {(kernel.arg_names.index(k),): v for k, v in const.items()}
    out = triton.compile(ASTSource(kernel, sig, constexprs=cx), target=GPUTarget("cuda", 90, 32),
                         options={"num_warps": num_warps, "num_stages": num_stages})
    assert len(out.asm["cubin"]) > 0, kernel.__name__
    print("ok", kernel.__name__, const, flush=True)

compile_(k1._first_occurrence_kernel,
         dict(ids_ptr="*i64", turn_ptr="*i32", obs_ptr="*u8", pat_ptr="*i32", voff_ptr="*i32", roff_ptr="*i32",
              key_ptr="*i64", count_ptr="*i64"),
         dict(SOURCE=0, BLOCK_L=1024, BLOCK_P=8))
for mode, turn_norm, out_t in ((0, True, "*fp32"), (2, False, "*fp64")):
    compile_(k2._turn_table_kernel,
             dict(outcome_ptr=out_t, first_ptr="*i64", nturn_ptr="*i64", gid_ptr="*i64", turn_adv_ptr="*fp32",
                  alpha="fp32", log2_gamma="fp32", eps="fp32"),
             dict(MODE=mode, NORM_TURN=turn_norm, BLOCK_R=4, BLOCK_B=1024, BLOCK_T=8))
compile_(k2._token_adv_kernel, dict(turn_ptr="*i32", mask_ptr="*u8", turn_adv_ptr="*fp32", tok_adv_ptr="*fp32"),
         dict(BLOCK_L=1024))
(bm2, bn2), (bm3, bn3) = k3.FILTER_TILES["dh"], k3.FILTER_TILES["dw"]
compile_(k3._soft_grad_kernel,
         dict(logits_ptr="*bf16", mask_ptr="*i8", lse_ptr="*fp32", ez_ptr="*fp32", glp_ptr="*fp32",
              gent_ptr="*fp32", keep_ptr="*u8", inv_temp="fp32"),
         dict(ROWS=bm3, UNIT=bn2, BLOCK_V=4096), num_warps=8)
for dt, f32 in (("bf16", False), ("fp32", True)):
    compile_(k3._filtered_dh_kernel,
             dict(dl_ptr="*" + dt, w_ptr="*" + dt, y_ptr="*i64", coef_ptr="*fp32", idx_ptr="*i32", cnt_ptr="*i32",
                  gh_ptr="*" + dt),
             dict(BM=bm2, BN=bn2, BH=k3.FILTER_BLOCK_H, DOT_F32=f32))
    compile_(k3._filtered_dw_kernel,
             dict(dl_ptr="*" + dt, h_ptr="*" + dt, idx_ptr="*i32", cnt_ptr="*i32", gw_ptr="*fp32", gb_ptr="*fp32"),
             dict(BM=bm3, BN=bn3, BH=k3.FILTER_BLOCK_H, HAS_BIAS=True, DOT_F32=f32))
compile_(k3._mm_acc_kernel, dict(a_ptr="*bf16", b_ptr="*bf16", c_ptr="*fp32"),
         dict(ACCUMULATE=True, DOT_F32=False, BM=128, BN=128, BK=64, GROUP_M=8), num_warps=8)
print("compiled all")
"""


def test_every_kernel_compiles_for_hopper():
    import triton.backends

    if "nvidia" not in triton.backends.backends:
        pytest.skip("this Triton build has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=600,
                          cwd=root)
    assert proc.returncode == 0 and "compiled all" in proc.stdout, (proc.stdout[-2000:], proc.stderr[-4000:])
