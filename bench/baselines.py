"""Baselines the kernels are timed against: batched PyTorch ops and plain Python loops."""
from __future__ import annotations

import torch


def make_k1_inputs(B: int, L: int, n_variants: int, var_len: int, device, seed: int = 0):
    """Rollout-like rows (prompt, then 4 turns of action + observation) with answer spellings
    planted in some observations; ``n_variants`` patterns of ``var_len`` tokens per row."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 150_000, (B, L), generator=g)
    pos = torch.arange(L)
    prompt = L // 8
    seg_len = max((L - prompt) // 8, 1)
    k = ((pos - prompt).clamp(min=0) // seg_len)
    turn = torch.where(pos >= prompt, (k // 2).clamp(max=3), torch.full_like(pos, -1)).int().expand(B, L).contiguous()
    obs = ((k % 2) == 1).expand(B, L).contiguous()
    pats = torch.randint(0, 150_000, (B, n_variants, var_len), generator=g)
    plant = torch.rand(B, generator=g) < 0.5
    where = torch.randint(prompt, L - var_len, (B,), generator=g)
    for b in torch.nonzero(plant).flatten().tolist():
        ids[b, where[b]: where[b] + var_len] = pats[b, 0]
    from tspo_kernels import pack_patterns
    packed = pack_patterns([[p.tolist() for p in row] for row in pats])
    return ids.to(device), turn.to(device), obs.to(device), packed.to(device), pats.to(device)


def k1_unfold(ids, turn, obs, pats, source: str = "observation"):
    """Batched window compare with ``Tensor.unfold`` (patterns of one length, (B, V, M))."""
    B, L = ids.shape
    M = pats.shape[-1]
    seg = torch.where(turn >= 0, 2 * turn.long() + obs.long(), torch.full_like(turn, -1, dtype=torch.long))
    pad = lambda x: torch.nn.functional.pad(x, (0, M - 1), value=-1)
    win = pad(ids).unfold(1, M, 1)                        # (B, L, M)
    segw = pad(seg).unfold(1, M, 1)
    same_seg = (segw == segw[..., :1]).all(-1)            # (B, L)
    sel = (turn >= 0) & (obs if source == "observation" else ~obs if source == "action" else True)
    hit = (win[:, None] == pats[:, :, None, :]).all(-1).any(1) & same_seg & sel
    key = torch.where(hit, turn.long() * L + torch.arange(L, device=ids.device), torch.iinfo(torch.long).max)
    best = key.amin(1)
    found = best != torch.iinfo(torch.long).max
    return torch.where(found, best // L, -1), torch.where(found, best % L, -1)


def k1_python(ids, turn, obs, pats, source: str = "observation"):
    """The obvious Python loop over rows, positions and patterns."""
    ids_l, turn_l, obs_l, pats_l = ids.tolist(), turn.tolist(), obs.tolist(), pats.tolist()
    out = []
    for b in range(len(ids_l)):
        res = (-1, -1)
        for s in range(len(ids_l[b])):
            t = turn_l[b][s]
            if t < 0 or (source == "observation" and not obs_l[b][s]) or (source == "action" and obs_l[b][s]):
                continue
            if any(ids_l[b][s:s + len(p)] == p and all(turn_l[b][s + j] == t and obs_l[b][s + j] == obs_l[b][s]
                                                       for j in range(len(p))) for p in pats_l[b]):
                res = (t, s)
                break
        out.append(res)
    return out


def make_k2_inputs(B: int, L: int, n: int, T: int, device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    gid = torch.arange(B) // n
    K = torch.randint(1, T + 1, (B,), generator=g)
    ks = torch.randint(-1, T, (B,), generator=g)
    R = torch.randint(0, 2, (B,), generator=g).float()
    pos = torch.arange(L)
    prompt = L // 8
    turn = torch.where(pos >= prompt, ((pos - prompt) * T // (L - prompt)), -1).int().expand(B, L).contiguous()
    mask = (turn >= 0) & (torch.rand(B, L, generator=g) < 0.8)
    return [x.to(device) for x in (R, ks, K, gid, turn, mask)]


def k2_grouped_ops(R, ks, K, gid, turn, mask, alpha: float = 0.5):
    """TSPO advantages (gamma = 1, group norm) with grouped tensor ops: unique + scatter."""
    T = int(K.max())
    k = torch.arange(T, device=R.device)[None]
    star = (ks[:, None] >= 0) & (ks[:, None] < K[:, None]) & (k <= ks[:, None])
    G = torch.where(k < K[:, None], R[:, None] + alpha * star, 0.0)
    _, inv, counts = torch.unique(gid, return_inverse=True, return_counts=True)
    n = counts.float()
    mean = torch.zeros(len(counts), device=R.device).scatter_add_(0, inv, G[:, 0]) / n
    var = torch.zeros(len(counts), device=R.device).scatter_add_(0, inv, (G[:, 0] - mean[inv]) ** 2) / (n - 1).clamp(min=1)
    sd = var.sqrt()
    mu_r, sd_r = torch.where(n[inv] < 2, 0.0, mean[inv]), torch.where(n[inv] < 2, 1.0, sd[inv])
    A = torch.where(sd_r[:, None] == 0, 0.0, (G - mu_r[:, None]) / (sd_r[:, None] + 1e-6))
    A = torch.where(k < K[:, None], A, 0.0)
    t = turn.long()
    return torch.where(mask & (t >= 0) & (t < T), A.gather(1, t.clamp(0, T - 1)), 0.0)


def k2_python(R, ks, K, gid, turn, mask, alpha: float = 0.5):
    """Plain Python: per group statistics, per token lookup."""
    import statistics
    R, ks, K, gid = R.tolist(), ks.tolist(), K.tolist(), gid.tolist()
    G = [[R[i] + (alpha if 0 <= ks[i] < K[i] and k <= ks[i] else 0.0) for k in range(K[i])] for i in range(len(R))]
    groups = {}
    for i, g in enumerate(gid):
        groups.setdefault(g, []).append(G[i][0])
    stats = {g: (statistics.mean(v), statistics.stdev(v)) if len(v) > 1 else (0.0, 1.0) for g, v in groups.items()}
    out = []
    for i, (trow, mrow) in enumerate(zip(turn.tolist(), mask.tolist())):
        mu, sd = stats[gid[i]]
        out.append([((G[i][t] - mu) / (sd + 1e-6) if sd else 0.0) if m and 0 <= t < K[i] else 0.0
                    for t, m in zip(trow, mrow)])
    return out
