"""Trained-LM-like inputs for the K3 benchmarks (the gradient-filtered path is judged on them).

Random hidden states and a random head (``make_inputs`` in ``test_bench_pg_loss.py``) give
logits of about N(0, 1): every token's probability is near 1/V, every entry of d loss / d logits
is tiny, and the filtered path skips almost every tile.  A trained LM is different: most of a
token's probability sits on a few candidates, a frequent-token core is plausible almost
everywhere, and rare tokens are plausible only in their context.  :func:`make_lm_like_inputs`
builds inputs of that kind from a fixed seed.

What it produces (``H >= 2``; ``rank_v`` is a token's frequency rank, a random permutation of
1..V, so token ids are not sorted by frequency):

* ``weight`` (V, H): column 0 is a Zipf-shaped bias, ``-zipf * ln(rank_v) / bias_scale``;
  columns 1..H-1 are ``amp_v (L_v P + noise_w xi_v / sqrt(H-1))`` with ``L_v`` ~ N(0, I_rank)
  (``rank`` = 64: the low-rank structure), ``P`` (rank, H-1) ~ N(0, 1/(H-1)) shared by all
  tokens, ``xi_v`` ~ N(0, I) (a full-rank part) and ``amp_v = sqrt((1 + kappa ln 100) /
  (1 + kappa ln rank_v))``, which shrinks slowly with the rank: frequent tokens take part in
  more contexts;
* ``hidden`` (N, H): column 0 is the constant ``bias_scale`` (so ``h W^T`` adds the bias with
  no ``bias=`` argument, which the baselines do not take); columns 1..H-1 are
  ``s_t (G_t P + noise_h xi_t)`` with ``G_t`` a random unit vector in R^rank (the context) and
  the per-token sharpness ``s_t = sharpness * exp(sharpness_sigma * N(0, 1))``;
* ``targets``: sampled from the model's own softmax(h W^T) (Gumbel-max, float32 logits of
  the ``dtype``-rounded h and W), as a policy samples its tokens;
* ``old_logp`` = log pi(target) + ``old_noise`` * N(0, 1) (pi_old a little off pi, so few tokens
  are clipped); ``advantages``: one N(0, 1) value per ``seq_len`` tokens; ``loss_mask``: each
  token in the loss with probability ``mask_p``.

With the defaults (zipf 1, rank 64, sharpness 3, sharpness_sigma 0.5, kappa 0.2, noise_h 0.3,
noise_w 1), measured at N = 2048, H = 3584, V = 152064 (bf16, seed 0): per-token entropy median
1.14 nats (deciles 0.06 ... 3.38), top-1 probability median 0.66 (deciles 0.26 ... 0.99), and the
average predicted distribution puts about equal mass (0.16-0.24) on each decade of frequency
ranks up to 10^5, as a calibrated LM on Zipfian text must (its average prediction is the unigram
distribution); bench/RESULTS.md has the full figures and ``python bench/lm_like.py [--real]``
prints them.  Logits are wider than a typical LM's: at H = 3584 the row maxima have a median of
about 20 and a 90th percentile of about 44 (row minima: median about -36), so bf16 logits carry
rounding errors of up to ~0.1 on the sharpest rows (more at small H, where the construction's
P P^T ~ I no longer holds).  kappa sets how strongly plausibility follows frequency, and with it
how many tiles the filtered path can skip: kappa = 0 scatters each row's candidates over the
whole vocabulary (a near worst case for the filter), larger kappa concentrates them in the
frequent core.  This is a model: no trained LM's activations were measured for it.

The draw is fixed by (seed, device type): CPU and CUDA generators give different (equally
distributed) values.  Large sizes are built in row blocks (no (V, H) float32 temporary).
"""
from __future__ import annotations

import argparse
import math
from typing import Optional, Sequence

import torch

PARAMS = dict(zipf=1.0, rank=64, sharpness=3.0, sharpness_sigma=0.5, kappa=0.2, noise_h=0.3, noise_w=1.0,
              bias_scale=4.0)
#: the filtered path's thresholds reported by :func:`lm_like_report`
REPORT_THRESHOLDS = (2.0 ** -12, 2.0 ** -10, 2.0 ** -8)
_DECILES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def build_lm_like_head(N: int, H: int, V: int, *, dtype=torch.bfloat16, device="cpu", seed: int = 0,
                       rows: int = 8192, **params):
    """``hidden`` (N, H), ``weight`` (V, H) in ``dtype`` and ``rank_of`` (V,) int64 (each token's
    frequency rank, 1 = most frequent), as described in the module docstring."""
    p = dict(PARAMS)
    unknown = set(params) - set(p)
    if unknown:
        raise TypeError(f"unknown LM-like parameters {sorted(unknown)}; known: {sorted(p)}")
    p.update(params)
    if H < 2:
        raise ValueError("H must be >= 2 (column 0 carries the bias)")
    dev = torch.device(device)
    g = torch.Generator(device=dev).manual_seed(seed)
    f32 = dict(dtype=torch.float32, device=dev)
    k, hc = int(p["rank"]), H - 1
    rank_of = torch.randperm(V, generator=g, device=dev) + 1
    log_rank = torch.log(rank_of.to(torch.float32))
    amp = torch.sqrt((1.0 + p["kappa"] * math.log(100.0)) / (1.0 + p["kappa"] * log_rank))
    proj = torch.randn(k, hc, generator=g, **f32) / math.sqrt(hc)
    weight = torch.empty(V, H, dtype=dtype, device=dev)
    weight[:, 0] = (-p["zipf"] * log_rank / p["bias_scale"]).to(dtype)
    for s in range(0, V, rows):
        e = min(V, s + rows)
        low = torch.randn(e - s, k, generator=g, **f32) @ proj
        low += torch.randn(e - s, hc, generator=g, **f32) * (p["noise_w"] / math.sqrt(hc))
        weight[s:e, 1:] = (amp[s:e, None] * low).to(dtype)
    ctx = torch.randn(N, k, generator=g, **f32)
    ctx /= ctx.norm(dim=1, keepdim=True)
    sharp = p["sharpness"] * torch.exp(p["sharpness_sigma"] * torch.randn(N, generator=g, **f32))
    hidden = torch.empty(N, H, dtype=dtype, device=dev)
    hidden[:, 0] = p["bias_scale"]
    for s in range(0, N, rows):
        e = min(N, s + rows)
        x = ctx[s:e] @ proj
        x += torch.randn(e - s, hc, generator=g, **f32) * p["noise_h"]
        hidden[s:e, 1:] = (sharp[s:e, None] * x).to(dtype)
    return hidden, weight, rank_of


def _logit_chunks(hidden, weight, rows: int):
    """(start, end, float32 logits of rows start:end) over ``hidden``, ``rows`` rows at a time.
    On CUDA the product runs in the input dtype (as the kernels'); on CPU in float32."""
    N = hidden.shape[0]
    w = weight.detach()
    if not w.is_cuda and w.dtype != torch.float32:
        w = w.float()                                   # once: CPU 16-bit products are slow
    for s in range(0, N, rows):
        e = min(N, s + rows)
        h = hidden[s:e].detach()
        z = (h @ w.t()).float() if h.is_cuda else h.float() @ w.t()
        yield s, e, z


class _Stats:
    """Per-token entropy, top-1 probability and count of tokens above 2^-12, gathered by chunk."""

    def __init__(self):
        self.parts = {"entropy": [], "top1": [], "n_above": [], "target_logp": []}
        self.mass = None

    def add(self, ls: torch.Tensor, logp_y: torch.Tensor):
        p = ls.exp()
        self.parts["entropy"].append(-(p * ls).sum(1).cpu())
        self.parts["top1"].append(p.amax(1).cpu())
        self.parts["n_above"].append((p > 2.0 ** -12).sum(1).float().cpu())
        self.parts["target_logp"].append(logp_y.cpu())
        m = p.sum(0, dtype=torch.float64)
        self.mass = m if self.mass is None else self.mass + m

    def result(self, N: int, rank_of: Optional[torch.Tensor] = None) -> dict:
        q = torch.tensor(_DECILES, dtype=torch.float64)
        out = {}
        for k, v in self.parts.items():
            x = torch.cat(v).double()
            out[k] = {"deciles": x.quantile(q).tolist(), "min": float(x.min()), "mean": float(x.mean()),
                      "max": float(x.max())}
        if rank_of is not None and self.mass is not None:
            V = rank_of.numel()
            mass = (self.mass / N).cpu()
            rk = rank_of.cpu()
            edges = [1]
            while edges[-1] * 10 <= V:
                edges.append(edges[-1] * 10)
            edges.append(V + 1)
            zipf_total = sum(1.0 / r for r in range(1, V + 1))
            rows = []
            for lo, hi in zip(edges[:-1], edges[1:]):
                sel = (rk >= lo) & (rk < hi)
                rows.append((lo, hi - 1, float(mass[sel].sum()), sum(1.0 / r for r in range(lo, hi)) / zipf_total))
            out["rank_decades"] = rows
        return out


def make_lm_like_inputs(N: int, H: int, V: int, dtype=torch.bfloat16, device="cpu", seed: int = 0, *,
                        mask_p: float = 0.8, seq_len: int = 1024, old_noise: float = 0.05,
                        rows: Optional[int] = None, stats: Optional[dict] = None, **params):
    """``(hidden, weight, targets, old_logp, advantages, loss_mask)`` like ``make_inputs`` in
    ``test_bench_pg_loss.py`` (hidden and weight are leaves that require grad), drawn as the
    module docstring says.  ``stats``, a dict, receives the measured per-token statistics
    (entropy, top-1 probability, tokens above 2^-12, target log-prob: deciles, min, mean, max;
    the mean predicted mass per decade of frequency ranks next to Zipf(1)'s)."""
    hidden, weight, rank_of = build_lm_like_head(N, H, V, dtype=dtype, device=device, seed=seed, **params)
    dev = hidden.device
    g = torch.Generator(device=dev).manual_seed(seed + 1_000_003)
    mask = torch.rand(N, generator=g, device=dev) < mask_p
    adv = torch.randn(-(-N // seq_len), generator=g, device=dev).repeat_interleave(seq_len)[:N].contiguous()
    targets = torch.empty(N, dtype=torch.long, device=dev)
    logp = torch.empty(N, dtype=torch.float32, device=dev)
    rows = rows or (4096 if dev.type == "cuda" else 256)
    collect = _Stats() if stats is not None else None
    for s, e, z in _logit_chunks(hidden, weight, rows):
        ls = torch.log_softmax(z, dim=1)
        u = torch.rand(z.shape, generator=g, device=dev).clamp_(min=1e-20)
        y = torch.argmax(ls - torch.log(-torch.log(u)), dim=1)      # Gumbel-max: y ~ softmax(z)
        targets[s:e] = y
        logp[s:e] = ls.gather(1, y[:, None])[:, 0]
        if collect is not None:
            collect.add(ls, logp[s:e])
        del ls, u, z
    old = logp + old_noise * torch.randn(N, generator=g, device=dev)
    if stats is not None:
        stats.update(collect.result(N, rank_of))
    return (hidden.requires_grad_(), weight.requires_grad_(), targets, old, adv, mask)


def filter_tile_fractions(hidden, weight, targets, old_logp, advantages, loss_mask,
                          thresholds: Sequence[float] = REPORT_THRESHOLDS, rows: int = 256,
                          chunks: Sequence[int] = (256, 512, 1024, 1536, 1920, 2048, 4736, 5504),
                          row_bound: Optional[float] = None) -> dict:
    """Kept-tile fractions of ``fused_linear_pg_loss(backward="filtered")`` at each threshold,
    from the forward only (no products): the vocabulary ordered by mean logit, the row
    statistics and the tile plan of :mod:`tspo_kernels.pg_loss` (its modules ``rows`` and
    ``filtered``, float32, PPO clip 0.2, no KL or entropy term; the row bound ``row_bound``,
    default the package's ``FILTER_ROW_BOUND``), ``rows`` token rows at a time (a multiple of
    128, so the tiles are those of any chunk that is a multiple of 128 too).

    Returns ``{threshold: {"kept_dh", "kept_dw", "skipped", "written", "rows_lowered",
    "dw_units_touched": {C: fraction}}}``: ``written``, the fraction of the logits that sweep 2
    rewrites (the union of both products' kept tiles); ``rows_lowered``, the fraction of loss
    rows whose threshold the row bound lowered; ``dw_units_touched[C]``, for each C in ``chunks``
    (multiples of 32, at most N), the mean over the full C-row chunks of the fraction of
    grad_weight's vocabulary tiles (128 wide) that at least one kept tile touches: their float32
    accumulator rows are read and written once per chunk."""
    from tspo_kernels import pg_loss as pg
    from tspo_kernels.pg_loss import filtered
    from tspo_kernels.pg_loss import rows as row_step
    from tspo_kernels.pg_loss.options import FilterOptions

    if rows % 128:
        raise ValueError("rows must be a multiple of 128")
    N, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    h = hidden.detach()
    w = weight.detach()
    if not h.is_cuda:
        h, w = h.float(), w.float()
    tok = pg._token_inputs(torch.float32, loss_mask, old_logp=old_logp, advantages=advantages)
    inv_norm, _ = pg._inv_norm(None, tok["mask"], torch.float32, dev)
    opt = pg._options(0.2, 0.2, None, 0.0, 10.0, 0.0, None, 1.0, None, None)
    order = filtered.vocab_permutation("mean_logit", h, w, None, tok["mask"])
    inv = torch.empty_like(order)
    inv[order] = torch.arange(V, device=dev)
    y_p = inv[targets]
    tiles = {k: tuple(v) for k, v in pg.FILTER_TILES.items()}
    unit = tiles["dh"][1]
    rho = pg.FILTER_ROW_BOUND if row_bound is None else row_bound
    filts = {t: FilterOptions(threshold=float(t), row_bound=rho, dense_above=1.0, order=order, tiles_dh=tiles["dh"],
                              tiles_dw=tiles["dw"], block_h=pg.FILTER_BLOCK_H, collect_stats=True)
             for t in thresholds}
    maps = {t: {"dh": [], "dw": [], "lowered": 0} for t in thresholds}
    mass, mass_bound = [], []            # per loss row, at the first threshold, per-entry rule only
    for s, e, z in _logit_chunks(h, w, rows):
        zp = z[:, order]
        del z
        tok_c = {k: v[s:e] for k, v in tok.items()}
        res = row_step.core_torch(zp, y_p[s:e], tok_c, opt, inv_norm, write_grad=False, has_loss=True,
                                  stats_unit=unit)
        # no entropy term here (g_ent = 0): a unit is droppable where its largest probability is
        # <= threshold; its mass exactly (unit log-sum-exp) against the unit-maximum bound
        lse = res["lse"][:, None]
        drop = torch.exp(res["zmax"] - lse) <= float(thresholds[0])
        loss_rows = tok_c["mask"] & (res["g_lp"] != 0)
        mass.append((torch.exp(res["zlse"] - lse) * drop).sum(1)[loss_rows].cpu())
        mass_bound.append((unit * torch.exp(res["zmax"] - lse) * drop).sum(1)[loss_rows].cpu())
        for t in thresholds:
            plan = filtered.filter_plan(res, e - s, V, filts[t], 1.0)
            maps[t]["dh"].append(plan["dh"].cpu())
            maps[t]["dw"].append(plan["dw"].cpu())
            maps[t]["lowered"] += int(plan["rows_lowered"])
        del zp, res
    n_loss = max(int(tok["mask"].sum()), 1)
    n_units = -(-V // unit)
    n_dw = -(-V // tiles["dw"][1])
    r0 = tiles["dw"][0]
    out = {}
    for t in thresholds:
        dh = torch.cat(maps[t]["dh"])[:, :n_units]
        dw = torch.cat(maps[t]["dw"])[: -(-N // r0), :n_dw]
        kept_dh = float(dh.float().mean())
        kept_dw = float(dw.float().mean())
        # sweep 2 rewrites the union of both products' kept tiles, at (r0 rows x unit) granularity
        rows_dw = dw.shape[0]
        write = (dh.repeat_interleave(tiles["dh"][0] // r0, 0)[:rows_dw]
                 | dw.repeat_interleave(tiles["dw"][1] // unit, 1)[:, :n_units])
        touched = {}
        for c in chunks:
            blocks = c // r0
            if c % r0 or blocks > rows_dw:
                continue
            fr = [float(dw[i:i + blocks].any(0).float().mean()) for i in range(0, rows_dw - blocks + 1, blocks)]
            touched[c] = sum(fr) / len(fr)                           # full chunks only
        out[float(t)] = {"kept_dh": kept_dh, "kept_dw": kept_dw, "skipped": 1.0 - 0.5 * (kept_dh + kept_dw),
                         "written": float(write.float().mean()), "rows_lowered": maps[t]["lowered"] / n_loss,
                         "dw_units_touched": touched}
    q = torch.tensor([0.1, 0.5, 0.9, 0.99], dtype=torch.float64)
    m, mb = torch.cat(mass).double(), torch.cat(mass_bound).double()
    out["dropped_mass"] = {"threshold": float(thresholds[0]), "quantiles": [0.1, 0.5, 0.9, 0.99],
                           "mass": m.quantile(q).tolist(), "unit_max_bound": mb.quantile(q).tolist(),
                           "rows_over": {r: (float((m > r).double().mean()), float((mb > r).double().mean()))
                                         for r in (2.0 ** -8, 2.0 ** -6, 2.0 ** -4)}}
    return out


def _fmt(xs, spec="6.2f"):
    return " ".join(format(x, spec) for x in xs)


def _say_filter(say, fr) -> None:
    """Print ``filter_tile_fractions``' result: per threshold the kept and skipped tiles, then the
    dropped mass."""
    for t, f in fr.items():
        if t == "dropped_mass":
            continue
        touched = ", ".join(f"C={c}: {v:.2f}" for c, v in f["dw_units_touched"].items())
        say(f"    threshold 2^{math.log2(t):.0f}: kept dh {f['kept_dh']:.3f}, dw {f['kept_dw']:.3f} -> skipped "
            f"{f['skipped']:.3f}; sweep 2 writes {f['written']:.3f}; rows lowered {f['rows_lowered']:.3f}; "
            f"dw vocabulary tiles touched per chunk: {touched}")
    _say_mass(say, fr["dropped_mass"])


def _say_mass(say, dm):
    over = ", ".join(f"{a:.3f} (bound {b:.3f})" for a, b in dm["rows_over"].values())
    say(f"  a row's droppable probability mass at threshold 2^{math.log2(dm['threshold']):.0f}, per-entry rule only "
        f"(quantiles {dm['quantiles']}): exactly {_fmt(dm['mass'], '.4f')}; unit-maximum bound "
        f"{_fmt(dm['unit_max_bound'], '.4f')}; rows over 2^-8 / 2^-6 / 2^-4: {over}")


def lm_like_report(N: int = 1024, H: int = 512, V: int = 32768, *, seed: int = 0, dtype=torch.bfloat16,
                   device="cpu", thresholds: Sequence[float] = REPORT_THRESHOLDS, uniform: bool = False,
                   row_bound: Optional[float] = None, print_fn=print, **params) -> dict:
    """Build LM-like inputs at (N, H, V) and print the entropy deciles, top-1 probability
    quantiles, tokens above 2^-12 per row, mass per frequency-rank decade and the filtered
    path's kept-tile fractions; ``uniform=True`` also prints the kept fractions of the random
    inputs (``make_inputs`` of ``test_bench_pg_loss.py``, same shape).  Returns the figures."""
    import time

    t0 = time.time()
    stats = {}
    inputs = make_lm_like_inputs(N, H, V, dtype, device, seed, stats=stats, **params)
    t1 = time.time()
    fr = filter_tile_fractions(*inputs, thresholds=thresholds, row_bound=row_bound)
    t2 = time.time()
    name = str(dtype).split(".")[-1]
    say = print_fn
    say(f"LM-like inputs: N={N} H={H} V={V} {name} seed={seed} on {torch.device(device).type}; "
        f"parameters {dict(PARAMS, **params)} (built + sampled in {t1 - t0:.1f} s, tile plan {t2 - t1:.1f} s)")
    say("  deciles                   " + "".join(f"{int(q * 100):>6}%" for q in _DECILES) + "     min   mean    max")
    for key, label, spec in (("entropy", "entropy (nats)", "6.2f"), ("top1", "top-1 probability", "6.2f"),
                             ("n_above", "tokens with p > 2^-12", "6.0f"), ("target_logp", "log pi(target)", "6.2f")):
        d = stats[key]
        say(f"  {label:<26} {_fmt(d['deciles'], spec)}  {d['min']:6.2f} {d['mean']:6.2f} {d['max']:6.2f}")
    say("  mean predicted mass per frequency-rank decade (model | Zipf(1) unigram):")
    say("    " + "  ".join(f"[{lo},{hi}]: {m:.3f} | {z:.3f}" for lo, hi, m, z in stats["rank_decades"]))
    from tspo_kernels import pg_loss as pg

    rho = pg.FILTER_ROW_BOUND if row_bound is None else row_bound
    say(f"  filtered path, LM-like (tiles dh {pg.FILTER_TILES['dh']}, dw {pg.FILTER_TILES['dw']}, vocabulary by mean "
        f"logit, row bound 2^{math.log2(rho):.0f}):")
    _say_filter(say, fr)
    out = {"stats": stats, "filter": fr}
    if uniform:
        import os
        import sys
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from test_bench_pg_loss import make_inputs

        t3 = time.time()
        fu = filter_tile_fractions(*make_inputs(N, H, V, dtype, device), thresholds=thresholds, row_bound=row_bound)
        say(f"  filtered path, uniform random inputs (make_inputs; {time.time() - t3:.1f} s):")
        _say_filter(say, fu)
        out["filter_uniform"] = fu
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description="Print the statistics of the LM-like K3 inputs (CPU by default).")
    ap.add_argument("--N", type=int, default=1024)
    ap.add_argument("--H", type=int, default=512)
    ap.add_argument("--V", type=int, default=32768)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--real", action="store_true", help="the benchmark's H=3584, V=152064 with N=2048 (float32 "
                    "products on CPU: a few GB, a minute or more)")
    ap.add_argument("--uniform", action="store_true", help="also the random inputs' kept fractions")
    ap.add_argument("--kappa", type=float, default=None)
    ap.add_argument("--row-bound-log2", type=float, default=None,
                    help="the filtered path's row bound as a power of 2 (default: the package's FILTER_ROW_BOUND)")
    a = ap.parse_args(argv)
    N, H, V = (2048, 3584, 152064) if a.real else (a.N, a.H, a.V)
    extra = {} if a.kappa is None else {"kappa": a.kappa}
    rho = None if a.row_bound_log2 is None else 2.0 ** a.row_bound_log2
    lm_like_report(N, H, V, seed=a.seed, device=a.device, uniform=a.uniform, row_bound=rho, **extra)


if __name__ == "__main__":
    main()
