"""LM head + clipped policy-gradient loss, forward + backward: TRL's chunked log-prob head
(``trl.kernels.ChunkedLogProbFunction``, what ``GRPOTrainer`` runs) followed by its token-level
clipped loss, against K3 (``fused_linear_pg_loss``), on the same inputs.

    python bench/compare_trl_head.py [--n 1024 --h 256 --v 16384 --threads 1 --reps 7]

On-policy (ratio 1, as GRPOTrainer with num_iterations=1); float32 on CPU (K3's PyTorch path,
TRL's torch fallback), bf16 and the Triton paths on CUDA.  Prints min / median ms per
forward + backward and the agreement of the two losses and hidden-state gradients.
"""
import argparse
import statistics
import time

import torch

import tspo_kernels as tk


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--h", type=int, default=256)
    ap.add_argument("--v", type=int, default=16384)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=7)
    a = ap.parse_args()
    from trl.kernels import ChunkedLogProbFunction

    torch.set_num_threads(a.threads)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dt = torch.bfloat16 if dev == "cuda" else torch.float32
    g = torch.Generator().manual_seed(0)
    h0 = torch.randn(a.n, a.h, generator=g).to(dev, dt)
    w0 = (torch.randn(a.v, a.h, generator=g) / a.h ** 0.5).to(dev, dt)
    y = torch.randint(0, a.v, (a.n,), generator=g).to(dev)
    adv = torch.randn(a.n, generator=g).to(dev)
    mask = torch.ones(a.n, dtype=torch.bool, device=dev)

    def trl_loss(h, w):
        lp, *_ = ChunkedLogProbFunction.apply(h, w, None, y, 1.0, 4096, None, 1.0, ("log_probs", "entropy"))
        ratio = torch.exp(lp - lp.detach())
        return -torch.min(ratio * adv, ratio.clamp(0.8, 1.28) * adv).sum() / a.n

    def k3_loss(h, w):
        return tk.fused_linear_pg_loss(h, w, y, None, adv, mask, eps_high=0.28).loss

    def bench(fn):
        ts = []
        for _ in range(a.reps):
            h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
            if dev == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            fn(h, w).backward()
            if dev == "cuda":
                torch.cuda.synchronize()
            ts.append(time.perf_counter() - t)
        return min(ts) * 1e3, statistics.median(ts) * 1e3

    print(f"device={dev} dtype={dt} N={a.n} H={a.h} V={a.v} threads={a.threads}")
    for name, fn in (("trl chunked head + loss", trl_loss), ("K3 fused_linear_pg_loss", k3_loss)) * 2:
        best, median = bench(fn)
        print(f"{name:26s} min {best:8.1f} ms   median {median:8.1f} ms")
    grads = []
    for fn in (trl_loss, k3_loss):
        h = h0.clone().requires_grad_()
        loss = fn(h, w0.clone().requires_grad_())
        loss.backward()
        grads.append((loss.detach().float(), h.grad.float()))
    (l1, g1), (l2, g2) = grads
    print(f"loss difference {float(l1 - l2):.2e}, hidden-gradient relative difference "
          f"{float((g1 - g2).norm() / g1.norm()):.2e}")


if __name__ == "__main__":
    main()
