"""The kernels' traffic and FLOP model (bench/RESULTS.md), evaluated for an H100 and an H200.

    python bench/traffic_model.py [--kept FILE.json]

Every number it prints is a prediction: bytes moved outside the matrix products over the card's
copy bandwidth, plus matrix-product FLOP over an assumed product rate.  Ceilings (measured on
this workplace's cards): H100 3.0 TB/s and 798 TFLOP/s (bf16), H200 4.2 TB/s and 787 TFLOP/s.
The occupancy each term needs is checked at compile time by ``bench/kernel_resources.py``
(``min_ctas``); the rates assumed for the Triton products are stated with each line.  Kept-tile
fractions of the filtered path come from ``python bench/lm_like.py --real`` (CPU, the package's
own plan); the defaults below are the figures of bench/RESULTS.md for the current row bound.
"""
from __future__ import annotations

import argparse
import json
import math

CARDS = {"H100": dict(bw=3.0e12, flops=798e12), "H200": dict(bw=4.2e12, flops=787e12)}
H, V = 3584, 152064                  # Qwen2.5-7B's LM head, bf16
E = 2                                # bytes per bf16 element
#: kept fractions at threshold 2^-12 on the LM-like inputs (f_dh, f_dw, sweep-2 written w, dw
#: vocabulary tiles touched per chunk g), for the row bound 2^-4 (default) and without it
KEPT = {"LM-like, rho 2^-4": dict(f_dh=0.678, f_dw=0.470, w=0.727, g=1.0),
        "LM-like, no row bound": dict(f_dh=0.477, f_dw=0.321, w=0.532, g=1.0)}
#: Triton block-sparse product rates, as a fraction of the card's product ceiling (assumed, not
#: measured: wgmma from shared memory, pointer loads pipelined over 3 stages, no TMA)
RATE_DH = (0.70, 0.85)               # 2 CTAs / SM, long loops over kept units
RATE_DW = (0.55, 0.75)               # 1 CTA / SM, short loops, a float32 tile read + written per program


def chunks(N: int, backward: str):
    from tspo_kernels import pg_loss as pg

    kw = dict(device="cuda", elem=E, need_h=True, need_w=True, weight_half=True)
    if backward == "filtered":
        kw.update(pg._filter_memory(V, H, E, ordered=True))
    rows = pg._chunk_rows(None, N, H, V, **kw)
    return rows, math.ceil(N / rows)


def dense(N: int, card: dict) -> dict:
    _, n = chunks(N, "dense")
    t_prod = 6 * N * V * H / card["flops"]
    row = 6 * N * V                                       # bf16: sweep 1 reads, sweep 2 reads + writes
    acc = 4 * V * H + (n - 1) * 8 * V * H                 # float32 accumulator, if not hidden
    rest = 6 * V * H + (4 * V * H + 4 * N * H) + 4 * N * H  # conversion, backward's scaling, h_w
    lo = t_prod + (row + rest) / card["bw"]
    return dict(lo=lo / t_prod, hi=(lo + acc / card["bw"]) / t_prod, chunks=n, t_floor_ms=t_prod * 1e3)


def logprobs(card: dict) -> float:
    return 1.0 + card["flops"] / (card["bw"] * H)


def filtered(N: int, card: dict, kept: dict) -> dict:
    rows, n = chunks(N, "filtered")
    F, BW = card["flops"], card["bw"]
    t_floor = 6 * N * V * H / F
    units = math.ceil(V / 64)
    streams = (2 * N * V                                   # sweep 1 reads the logits
               + 8 * N * units                             # unit maxima + log-sum-exps written
               + 3.0 * N * V                               # the plan: ~25 passes over (C, V/64) float32 (estimate)
               + 4 * N * V * kept["w"]                     # filtered sweep 2: kept tiles read + written
               + 18 * N * H + 24 * V * H)                  # target term, per-call conversions
    out = {}
    for name, (r_dh, r_dw) in (("fast", (RATE_DH[1], RATE_DW[1])), ("slow", (RATE_DH[0], RATE_DW[0]))):
        t = (2 * N * V * H / F                             # product 1, cuBLAS
             + 2 * N * V * H * kept["f_dh"] / (r_dh * F)
             + max(2 * N * V * H * kept["f_dw"] / (r_dw * F), (2 * N * V * kept["f_dw"] + 8 * V * H * kept["g"] * n) / BW)
             + streams / BW)
        out[name] = t / t_floor
    return dict(lo=out["fast"], hi=out["slow"], rows=rows, chunks=n)


def k1(card: dict) -> dict:
    B, L, block = 1024, 4096, 512
    bytes_ = B * L * 8 + 0.09 * B * L * 5                  # int64 ids; turn + flags in ~9 % of blocks
    programs, resident = B * L // block, 132 * 10          # 10 CTAs / SM (bench/kernel_resources.py)
    per_program = (2.0e-6, 3.5e-6)                         # dependent loads (L2 / DRAM), reductions, atomics
    lat = tuple(programs / resident * p for p in per_program)
    return dict(bytes_us=bytes_ / card["bw"] * 1e6, latency_us=tuple(x * 1e6 for x in lat))


def main(argv=None):
    ap = argparse.ArgumentParser(description="Print the traffic / FLOP model's predictions for H100 and H200.")
    ap.add_argument("--kept", help="JSON {name: {f_dh, f_dw, w, g}} of kept fractions to use instead")
    a = ap.parse_args(argv)
    kept = json.load(open(a.kept)) if a.kept else KEPT
    for cname, card in CARDS.items():
        print(f"{cname}: {card['bw'] / 1e12:.1f} TB/s, {card['flops'] / 1e12:.0f} TFLOP/s; ridge "
              f"{card['flops'] / card['bw']:.0f} FLOP/B")
        for N in (16384, 32768):
            d = dense(N, card)
            print(f"  K3 dense        N={N}: {d['lo']:.3f} ... {d['hi']:.3f} x floor ({d['chunks']} chunks; floor "
                  f"{d['t_floor_ms']:.1f} ms at the ceiling)")
            for name, k in kept.items():
                f = filtered(N, card, k)
                print(f"  K3 filtered     N={N}, {name}: {f['lo']:.3f} ... {f['hi']:.3f} x floor "
                      f"({f['chunks']} x {f['rows']} rows)")
        print(f"  K3 log-probs    {logprobs(card):.3f} x one product (any N)")
        k = k1(card)
        print(f"  K1              bytes {k['bytes_us']:.1f} us; latency chain {k['latency_us'][0]:.1f} ... "
              f"{k['latency_us'][1]:.1f} us (device time, fill excluded)")
        print(f"  K2              copy floor {9 * 1024 * 4096 / card['bw'] * 1e6:.1f} us")


if __name__ == "__main__":
    main()
