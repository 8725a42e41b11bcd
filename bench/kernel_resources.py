"""GPU resources of every Triton kernel configuration of tspo_kernels, compiled for Hopper (sm_90a)
on any machine: Triton's bundled ptxas and cuobjdump run without a GPU.

    python bench/kernel_resources.py [--json FILE] [--jobs N] [--only SUBSTRING]

For each configuration the launchers can choose on a GPU (:func:`configurations`; the launch
settings come from the launchers' own functions: ``first_occurrence.k1_launch``,
``pg_loss.rows.row_launch``, ``pg_loss.filtered.filtered_launch``, ``pg_loss.gemm.mm_acc_launch``,
and K2's launcher defaults) it compiles the kernel with ``triton.compile`` for
``GPUTarget("cuda", 90, 32)`` and reads from the cubin (``cuobjdump -res-usage`` and ``-sass``):

* registers per thread, the stack frame and the local-memory spill instructions (STL / LDL);
* shared memory per CTA: Triton's dynamic allocation plus the 1 KiB the CUDA runtime reserves
  per CTA on sm_90 (``SHARED`` in cuobjdump);
* CTAs per SM on an H100 / H200 (both sm_90: 65,536 registers, 64 warps, 32 CTAs and 228 KiB of
  shared memory per SM, at most 227 KiB per CTA; registers allocated per warp in units of 256);
* Hopper tensor-core instructions (``wgmma.mma_async``) in the PTX;
* 32-bit address arithmetic (:func:`narrow_offsets`): in the TTGIR, an i32 multiplication of two
  run-time values (an index and a stride, say) that feeds a pointer offset.  Such a product can
  pass 2^31 at large shapes (k * V at k >= 14,123 rows for V = 152,064) and wrap; products with
  a compile-time factor (``program_id * BLOCK``) are bounded by the grid and are allowed.

and checks each against what the kernel's traffic model in bench/RESULTS.md assumes (the
``min_ctas`` of its :class:`Config`): no spills (no stack frame: local memory is only spilled
registers here; the SASS's STL / LDL are counted when there is one), shared memory within the SM's limit, at least
``min_ctas`` CTAs per SM, no 32-bit address products.  It prints one table row per configuration
and, with ``--json``, writes the figures; exit status 1 if any check fails.
``tests/test_kernels_compile.py`` runs it.  The counts come from the Triton installed here; the
GPU machines may run another Triton version (bench/RESULTS.md says which was used).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from importlib import import_module
from typing import Dict, List, Optional

# ----------------------------------------------------------------------------- the SM (sm_90: H100, H200)
REGS_PER_SM = 65536
REG_ALLOC_UNIT = 256            # registers, allocated per warp
MAX_WARPS_PER_SM = 64
MAX_CTAS_PER_SM = 32
SMEM_PER_SM = 228 * 1024
SMEM_PER_CTA_MAX = 227 * 1024
SMEM_RESERVED_PER_CTA = 1024    # the runtime's own, per CTA


def ctas_per_sm(regs: int, num_warps: int, smem: int) -> Dict[str, int]:
    """CTAs per SM by each limit (``smem``: Triton's dynamic shared memory of one CTA)."""
    per_warp = -(-regs * 32 // REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    by_regs = (REGS_PER_SM // per_warp) // num_warps if per_warp else MAX_CTAS_PER_SM
    by_smem = SMEM_PER_SM // (smem + SMEM_RESERVED_PER_CTA)
    by_warps = MAX_WARPS_PER_SM // num_warps
    return {"regs": by_regs, "smem": by_smem, "warps": by_warps,
            "ctas": min(by_regs, by_smem, by_warps, MAX_CTAS_PER_SM)}


@dataclass
class Config:
    """One kernel configuration a launcher can choose."""

    kernel: str                         # module:attribute of the @triton.jit kernel
    label: str                          # what the configuration is (table row)
    types: Dict[str, str]               # non-i32 argument types (pointers, floats)
    constexprs: Dict[str, object]
    num_warps: int
    num_stages: int = 3
    ints: Dict[str, int] = field(default_factory=dict)   # integer arguments at a production shape
    min_ctas: int = 1                   # CTAs per SM the traffic model assumes
    why: str = ""                       # the model's reason for min_ctas

    def specialization(self, arg_names):
        """(signature, constexprs, attrs) as a launch specialises them: an integer argument of
        value 1 becomes the constant 1, one divisible by 16 and every pointer (PyTorch's
        allocations are aligned) carry ``tt.divisibility`` 16 (what lets Triton vectorise)."""
        sig, cx, attrs = {}, {}, {}
        for i, name in enumerate(arg_names):
            if name in self.constexprs or self.ints.get(name) == 1:
                sig[name] = "constexpr"
                cx[(i,)] = self.constexprs.get(name, 1)
                continue
            sig[name] = self.types.get(name, "i32")
            if sig[name].startswith("*") or (name in self.ints and self.ints[name] % 16 == 0):
                attrs[(i,)] = [["tt.divisibility", 16]]
        return sig, cx, attrs


@dataclass
class Result:
    kernel: str
    label: str
    num_warps: int
    regs: int = 0
    stack: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    smem: int = 0
    ctas: int = 0
    limits: dict = field(default_factory=dict)
    min_ctas: int = 1
    wgmma: int = 0
    narrow: List[str] = field(default_factory=list)
    seconds: float = 0.0
    error: str = ""

    def failures(self) -> List[str]:
        out = []
        if self.error:
            return [f"does not compile: {self.error}"]
        if self.stack or self.spill_stores or self.spill_loads:
            out.append(f"spills: stack frame {self.stack} B, {self.spill_stores} STL / {self.spill_loads} LDL")
        if self.smem + SMEM_RESERVED_PER_CTA > SMEM_PER_CTA_MAX:
            out.append(f"shared memory {self.smem + SMEM_RESERVED_PER_CTA} B > {SMEM_PER_CTA_MAX} B per CTA")
        if self.ctas < self.min_ctas:
            out.append(f"{self.ctas} CTAs per SM (limits {self.limits}) < {self.min_ctas} the traffic model assumes")
        if self.narrow:
            out.append("32-bit address products: " + "; ".join(self.narrow))
        return out


# ----------------------------------------------------------------------------- configurations
def _pow2_range(lo: int, hi: int):
    x = lo
    while x <= hi:
        yield x
        x *= 2


#: the production shape the integer arguments take (Qwen2.5-7B's head; K1 / K2 at B = 1024, L = 4096)
SHAPE = dict(V=152064, H=3584, C=1920, B=1024, L=4096, T=5)


def configurations() -> List[Config]:
    """Every configuration the launchers choose on a GPU (block sizes, warps, stages, tiles,
    flags, operand dtypes), each once, specialised as a launch at :data:`SHAPE` would be."""
    V, H, C, B, L, T = (SHAPE[k] for k in ("V", "H", "C", "B", "L", "T"))
    k1 = import_module("tspo_kernels.first_occurrence")
    k2 = import_module("tspo_kernels.advantages")
    pg = import_module("tspo_kernels.pg_loss")
    rows = import_module("tspo_kernels.pg_loss.rows")
    filt = import_module("tspo_kernels.pg_loss.filtered")
    gemm = import_module("tspo_kernels.pg_loss.gemm")
    out: List[Config] = []

    # K1: one configuration per row length class (the block follows L up to its cap) and source;
    # ids as the trainer passes them (int64) and as int32
    seen = set()
    for L in (16, 64, 256, 512, 4096):
        cfg = k1.k1_launch(L)
        for source in (0, 1, 2):
            for ids in ("*i64", "*i32"):
                key = (cfg["BLOCK_L"], source, ids)
                if key in seen or (ids == "*i32" and L != 4096):
                    continue
                seen.add(key)
                out.append(Config(
                    "tspo_kernels.first_occurrence:_first_occurrence_kernel",
                    f"BLOCK_L={cfg['BLOCK_L']} source={source} ids={ids[1:]}",
                    dict(ids_ptr=ids, turn_ptr="*i32", obs_ptr="*u8", pat_ptr="*i32", voff_ptr="*i32",
                         roff_ptr="*i32", key_ptr="*i64", count_ptr="*i64"),
                    dict(SOURCE=source, BLOCK_L=cfg["BLOCK_L"], BLOCK_P=cfg["BLOCK_P"]), cfg["num_warps"],
                    ints=dict(L=L, n_blocks=-(-L // cfg["BLOCK_L"]), s_ids=L, s_turn=L, s_obs=L),
                    min_ctas=min(MAX_CTAS_PER_SM, 32 // cfg["num_warps"]),
                    why="latency-bound (three dependent loads, reductions, two atomics per program): half "
                        "the SM's warps resident, 32 of 64"))

    # K2: the launcher's defaults (blocks of 1024 trajectories / tokens, up to 8 turns), every mode
    import inspect
    defaults = {k: v.default for k, v in inspect.signature(k2._turn_advantages_triton).parameters.items()
                if v.default is not inspect.Parameter.empty}
    for mode, code in k2._MODE_CODE.items():
        for turn_norm in (False, True):
            out.append(Config(
                "tspo_kernels.advantages:_turn_table_kernel", f"mode={mode} norm={'turn' if turn_norm else 'group'}",
                dict(outcome_ptr="*fp32", first_ptr="*i64", nturn_ptr="*i64", gid_ptr="*i64", turn_adv_ptr="*fp32",
                     alpha="fp32", log2_gamma="fp32", eps="fp32"),
                dict(MODE=code, NORM_TURN=turn_norm, BLOCK_R=defaults.get("block_r", 4),
                     BLOCK_B=defaults.get("block_b", 1024), BLOCK_T=8), 4, ints=dict(B=B, T=T),
                why="a few programs per SM; latency-bound, not in the traffic model's bandwidth terms"))
    out.append(Config("tspo_kernels.advantages:_token_adv_kernel", "BLOCK_L=1024",
                      dict(turn_ptr="*i32", mask_ptr="*u8", turn_adv_ptr="*fp32", tok_adv_ptr="*fp32"),
                      dict(BLOCK_L=defaults.get("block_l", 1024)), 4, min_ctas=4,
                      ints=dict(L=L, T=T, s_turn=L, s_mask=L, s_tok=L),
                      why="a stream at copy bandwidth: 16+ resident warps per SM"))

    # K3 row kernel: log-probs, dense loss (options on / off), filtered sweep 1, per dtype;
    # the block sizes the launcher picks below V = 4096
    flags = ("HAS_LOSS", "HAS_REF", "HAS_DUAL", "HAS_TIS", "HAS_W", "HAS_OLD", "WRITE_GRAD", "STATS")
    unit = pg.FILTER_TILES["dh"][1]
    variants = {
        "log-probs": dict.fromkeys(flags, False),
        "dense, all options": dict(dict.fromkeys(flags, True), STATS=False),
        "dense, no options": dict(dict.fromkeys(flags, False), HAS_LOSS=True, HAS_OLD=True, WRITE_GRAD=True),
        "filtered sweep 1, all options": dict(dict.fromkeys(flags, True), WRITE_GRAD=False),
    }
    for Vr in (V, 2048, 1024):
        block, warps = rows.row_launch(Vr, unit, interpret=False)
        for dt in (("bf16", "fp16", "fp32") if Vr >= 4096 else ("bf16",)):
            for name, fl in variants.items():
                if Vr < 4096 and name != "dense, all options":
                    continue
                out.append(Config(
                    "tspo_kernels.pg_loss.rows:_pg_rows_kernel", f"{name} {dt} BLOCK_V={block}",
                    dict(logits_ptr="*" + dt, targets_ptr="*i64", mask_ptr="*i8", inv_temp="fp32", ratio_lo="fp32",
                         ratio_hi="fp32", dual_clip="fp32", beta="fp32", kl_clamp="fp32", entropy_coef="fp32",
                         tis_cap="fp32", **{p: "*fp32" for p in ("old_ptr", "adv_ptr", "ref_ptr", "roll_ptr", "w_ptr",
                                                                 "inv_norm_ptr", "logp_ptr", "ent_ptr", "kl_ptr",
                                                                 "tok_loss_ptr", "clipped_ptr", "lse_ptr", "ez_ptr",
                                                                 "glp_ptr", "gent_ptr", "zmax_ptr", "zlse_ptr")}),
                    dict(fl, UNIT=unit if fl["STATS"] else 1, BLOCK_V=block), warps, min_ctas=2,
                    ints=dict(stride_row=Vr, V=Vr, n_units=-(-Vr // unit)),
                    why="two sweeps at copy bandwidth: 2 CTAs of 8 warps keep 2 rows' loads in flight per SM"))
        if Vr >= 4096:
            for dt in ("bf16", "fp32"):
                out.append(Config(
                    "tspo_kernels.pg_loss.filtered:_soft_grad_kernel", f"{dt} BLOCK_V={block}",
                    dict(logits_ptr="*" + dt, mask_ptr="*i8", lse_ptr="*fp32", ez_ptr="*fp32", glp_ptr="*fp32",
                         gent_ptr="*fp32", keep_ptr="*u8", inv_temp="fp32"),
                    dict(ROWS=pg.FILTER_TILES["dw"][0], UNIT=unit, BLOCK_V=block), warps, min_ctas=2,
                    ints=dict(stride_row=Vr, keep_stride=-(-Vr // unit), V=Vr),
                    why="as the row kernel's sweep 2"))

    # K3 block-sparse products: per operand dtype, the hidden block of H >= 128 and of small H
    (bm2, bn2), (bm3, bn3) = pg.FILTER_TILES["dh"], pg.FILTER_TILES["dw"]
    for Hp in (H, 64):
        for dt in (("bf16", "fp16", "fp32") if Hp >= 128 else ("bf16",)):
            f32 = dt == "fp32"
            cfg = filt.filtered_launch(Hp, pg.FILTER_BLOCK_H, f32, interpret=False)
            out.append(Config(
                "tspo_kernels.pg_loss.filtered:_filtered_dh_kernel", f"{dt} {bm2}x{bn2} tiles BH={cfg['BH']}",
                dict(dl_ptr="*" + dt, w_ptr="*" + dt, y_ptr="*i64", coef_ptr="*fp32", idx_ptr="*i32", cnt_ptr="*i32",
                     gh_ptr="*" + dt),
                dict(BM=bm2, BN=bn2, BH=cfg["BH"], DOT_F32=f32), cfg["num_warps"],
                ints=dict(s_dl=V, s_w=Hp, idx_stride=-(-V // bn2), s_gh=Hp, C=C, V=V, H=Hp),
                why="a tensor-core product: one CTA per SM at full rate, no spills"))
            for bias in ((True, False) if dt == "bf16" and Hp >= 128 else (True,)):
                out.append(Config(
                    "tspo_kernels.pg_loss.filtered:_filtered_dw_kernel",
                    f"{dt} {bm3}x{bn3} tiles x{cfg['BLOCKS']} BH={cfg['BH']}{' bias' if bias else ''}",
                    dict(dl_ptr="*" + dt, h_ptr="*" + dt, idx_ptr="*i32", cnt_ptr="*i32", gw_ptr="*fp32",
                         gb_ptr="*fp32"),
                    dict(BM=bm3, BN=bn3, BH=cfg["BH"], BLOCKS=cfg["BLOCKS"], HAS_BIAS=bias, DOT_F32=f32),
                    cfg["num_warps"], ints=dict(s_dl=V, s_h=Hp, idx_stride=-(-C // bm3), s_gw=Hp, C=C, V=V, H=Hp),
                    why="a tensor-core product: one CTA per SM at full rate, no spills"))

    # K3 float32-accumulating GEMM (16-bit operands only)
    cfg = gemm.mm_acc_launch(interpret=False)
    for dt in ("bf16", "fp16"):
        for acc in (False, True):
            out.append(Config(
                "tspo_kernels.pg_loss.gemm:_mm_acc_kernel", f"{dt} {cfg['BM']}x{cfg['BN']}x{cfg['BK']}"
                f"{' accumulate' if acc else ''}", dict(a_ptr="*" + dt, b_ptr="*" + dt, c_ptr="*fp32"),
                dict(ACCUMULATE=acc, DOT_F32=False, BM=cfg["BM"], BN=cfg["BN"], BK=cfg["BK"], GROUP_M=cfg["GROUP_M"]),
                cfg["num_warps"], cfg["num_stages"],
                ints=dict(M=V, N=H, K=5504, s_am=1, s_ak=V, s_bk=H, s_bn=1, s_cm=H, s_cn=1),   # acc += logits^T h
                why="a tensor-core GEMM: one CTA per SM, no spills"))
    return out


# ----------------------------------------------------------------------------- 32-bit address products
_OP = re.compile(r"^\s*(%[\w.$-]+)(?::\d+)?\s*=\s*([\w.]+)\s*(.*)$")
_VALUE = re.compile(r"%[\w.$-]+")
_PASS = {"tt.splat", "tt.broadcast", "tt.expand_dims", "ttg.convert_layout", "tt.reshape", "tt.trans"}


def narrow_offsets(ttgir: str) -> List[str]:
    """i32 multiplications of two run-time values that feed a pointer offset (``tt.addptr``), as
    ``"%name (line)"`` strings; empty when every such product is formed in 64 bits."""
    defs = {}
    addptr_offsets = []
    for lineno, line in enumerate(ttgir.splitlines(), 1):
        m = _OP.match(line)
        if not m:
            continue
        name, op, rest = m.groups()
        body = rest.split(" loc(")[0]
        args_part, _, type_part = body.partition(" : ")
        operands = _VALUE.findall(args_part)
        defs[name] = (op, operands, type_part, lineno)
        if op == "tt.addptr" and len(operands) >= 2:
            addptr_offsets.append(operands[1])
        if op == "scf.for":                                        # block arguments: run-time values
            for arg in re.findall(r"(%[\w.$-]+)\s*=", args_part):
                defs.setdefault(arg, ("blockarg", [], "", lineno))

    def constant(v, depth=0):
        d = defs.get(v)
        if d is None or depth > 50:
            return False                                          # function argument: run-time
        op, operands, _, _ = d
        if op == "arith.constant":
            return True
        return op in _PASS and bool(operands) and constant(operands[0], depth + 1)

    found, seen, stack = [], set(), list(addptr_offsets)
    while stack:
        v = stack.pop()
        if v in seen or v not in defs:
            continue
        seen.add(v)
        op, operands, type_part, lineno = defs[v]
        if op == "arith.muli" and re.search(r"(^|x)i32\b", type_part.replace(" ", "")):
            if len(operands) == 2 and not any(constant(o) for o in operands):
                found.append(f"{v} (TTGIR line {lineno})")
        stack.extend(operands)
    return found


# ----------------------------------------------------------------------------- compile and read
def _bin(tool: str) -> str:
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)


def measure(cfg: Config) -> Result:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    res = Result(cfg.kernel, cfg.label, cfg.num_warps, min_ctas=cfg.min_ctas)
    t0 = time.time()
    try:
        module, attr = cfg.kernel.split(":")
        kernel = getattr(import_module(module), attr)
        unknown = (set(cfg.types) | set(cfg.constexprs) | set(cfg.ints)) - set(kernel.arg_names)
        if unknown:
            raise ValueError(f"no such arguments: {sorted(unknown)}")
        sig, cx, attrs = cfg.specialization(kernel.arg_names)
        out = triton.compile(ASTSource(kernel, sig, constexprs=cx, attrs=attrs), target=GPUTarget("cuda", 90, 32),
                             options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "k.cubin")
            with open(path, "wb") as f:
                f.write(out.asm["cubin"])
            usage = subprocess.run([_bin("cuobjdump"), "-res-usage", path], capture_output=True, text=True,
                                   check=True).stdout
            fields = dict(re.findall(r"(\w+):(\d+)", usage.split("Function", 1)[1]))
            res.regs, res.stack = int(fields["REG"]), int(fields["STACK"])
            if res.stack:                   # local memory in use: count the spill instructions
                sass = subprocess.run([_bin("cuobjdump"), "-sass", path], capture_output=True, text=True,
                                      check=True).stdout
                res.spill_stores = len(re.findall(r"\bSTL(\.\w+)*\b", sass))
                res.spill_loads = len(re.findall(r"\bLDL(\.\w+)*\b", sass))
        res.wgmma = len(re.findall(r"\bwgmma\.mma_async\b", out.asm["ptx"]))
        res.smem = int(out.metadata.shared)
        res.limits = ctas_per_sm(res.regs, cfg.num_warps, res.smem)
        res.ctas = res.limits["ctas"]
        res.narrow = narrow_offsets(out.asm["ttgir"])
    except Exception as exc:                # reported as the configuration's failure
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        res.error = f"{type(exc).__name__}: {' / '.join(lines[:1] + lines[-1:]) if lines else ''}"
    res.seconds = round(time.time() - t0, 1)
    return res


def run(configs: List[Config], jobs: int) -> List[Result]:
    if jobs <= 1:
        return [measure(c) for c in configs]
    import multiprocessing as mp

    with mp.get_context("fork").Pool(jobs) as pool:
        return pool.map(measure, configs, chunksize=1)


def table(results: List[Result]) -> str:
    head = ("| kernel | configuration | warps | registers | spills (STL / LDL, stack B) | shared memory / CTA "
            "| CTAs / SM (limit) | model needs | wgmma | check |")
    lines = [head, "|" + "---|" * 10]
    for r in results:
        if r.error:
            lines.append(f"| `{r.kernel.split(':')[1]}` | {r.label} | {r.num_warps} | | | | | {r.min_ctas} | | "
                         f"**FAIL**: {r.error} |")
            continue
        bound = min((k for k in ("regs", "smem", "warps") if r.limits[k] == r.ctas), default="ctas")
        fails = r.failures()
        lines.append(
            f"| `{r.kernel.split(':')[1]}` | {r.label} | {r.num_warps} | {r.regs} | {r.spill_stores} / "
            f"{r.spill_loads}, {r.stack} | {(r.smem + SMEM_RESERVED_PER_CTA) / 1024:.1f} KiB | {r.ctas} ({bound}) | "
            f"{r.min_ctas} | {r.wgmma} | {'**FAIL**: ' + '; '.join(fails) if fails else 'ok'} |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write the figures to this file")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="compile in this many processes")
    ap.add_argument("--only", default="", help="only configurations whose kernel or label contains this")
    a = ap.parse_args(argv)
    # compiled code, not the interpreter: before any kernel module is imported (and only when run,
    # never on import: tests import this module's helpers in a process that runs interpreted kernels)
    os.environ.pop("TRITON_INTERPRET", None)
    import triton

    configs = [c for c in configurations() if a.only in c.kernel or a.only in c.label]
    t0 = time.time()
    results = run(configs, a.jobs)
    print(f"tspo_kernels compiled for sm_90a (GPUTarget('cuda', 90, 32)) with triton {triton.__version__}; "
          f"{len(results)} configurations in {time.time() - t0:.0f} s; CTAs per SM for an H100 / H200 SM")
    print(table(results))
    bad = [(r, f) for r in results for f in r.failures()]
    for r, f in bad:
        print(f"FAIL {r.kernel.split(':')[1]} [{r.label}]: {f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"triton": triton.__version__, "results": [dict(asdict(r), failures=r.failures())
                                                                 for r in results]}, f, indent=1)
    print("all checks passed" if not bad else f"{len(bad)} check(s) failed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
