"""K2 (turn advantages): docs/algorithm.md §3 by hand, and the Triton kernel vs the PyTorch reference."""
import random
import statistics

import pytest
import torch

import tspo_kernels as tk
from tspo_kernels import reference as ref
from tspo_kernels.advantages import _turn_advantages_triton

# float32 kernel vs float64 reference
TOL = {"rtol": 1e-5, "atol": 2e-5}
U32 = 2.0 ** -24            # float32 unit roundoff


def _assert_adv_close(got, want, R, ks, K, gid, *, alpha, gamma):
    """``TOL`` widened by the conditioning of each row's group.

    The kernel forms the returns G in float32, so each carries an error of a few ulps of max|G|;
    A = (G - mu) / (sd + eps) multiplies it by max|G| / sd, which is large where a group's
    values nearly coincide (alpha 0.3, gamma 0.9: 0.9^3 + 0.3 * 0.9 = 0.999 next to 1.0 gives
    sd 7e-4 and |A| = 156).  Per element: atol + rtol |A| + 16 u kappa (1 + |A|), kappa =
    max|G| / (smallest nonzero sd among the group's statistics), in both return forms (the
    TSPO returns and the outcome-only ones)."""
    T = want.shape[1]
    Gs = [ref.turn_returns(R, ks, K, T, alpha=alpha, gamma=gamma),
          ref.turn_returns(R, ks, K, T, alpha=0.0, gamma=1.0)]
    Kl = K.long()
    kappa = torch.zeros(len(R), dtype=torch.float64)
    for g in torch.unique(gid):
        rows = ((gid == g) & (Kl >= 1) & torch.isfinite(R)).nonzero().flatten()
        for G in Gs:
            sds = [G[rows[Kl[rows] > k], k] for k in range(T)]
            sds = [float(v.std()) for v in sds if v.numel() >= 2]
            sds = [s for s in sds if s > 0]
            if sds and rows.numel():
                big = float(G[rows].abs().max())
                kappa[gid == g] = torch.maximum(kappa[gid == g], torch.tensor(big / min(sds), dtype=torch.float64))
    a = want.double().abs()
    bound = TOL["atol"] + TOL["rtol"] * a + 16 * U32 * kappa[:, None] * (1 + a)
    err = (got.double() - want.double()).abs()
    bad = ~(err <= bound) & ~(got.isnan() & want.isnan())
    assert not bad.any(), (f"{int(bad.sum())} of {bad.numel()} elements off; worst at {tuple(bad.nonzero()[0].tolist())}: "
                           f"got {got[bad][0].item()}, want {want[bad][0].item()}, bound {bound[bad][0].item():.3g}")


def _assert_both_close(got, want, R, ks, K, gid, turn, mask, *, alpha, gamma):
    """Turn advantages with ``_assert_adv_close``; token advantages are the same values spread over the tokens."""
    _assert_adv_close(got[1], want[1], R, ks, K, gid, alpha=alpha, gamma=gamma)
    T = want[1].shape[1]
    t = turn.long()
    inside = mask & (t >= 0) & (t < T)
    assert torch.equal(got[0], torch.where(inside, got[1].gather(1, t.clamp(0, T - 1)), torch.zeros(())))
    assert torch.equal(want[0], torch.where(inside, want[1].gather(1, t.clamp(0, T - 1)), torch.zeros(())))


def _layout(K, L, prompt=2, per_turn=3):
    """turn_id and loss_mask rows: prompt, then per turn `per_turn` action tokens and 2 observation tokens."""
    turn = torch.full((len(K), L), -1, dtype=torch.int32)
    mask = torch.zeros(len(K), L, dtype=torch.bool)
    for b, k_b in enumerate(K):
        t = prompt
        for k in range(k_b):
            turn[b, t:t + per_turn + 2] = k
            mask[b, t:t + per_turn] = True
            t += per_turn + 2
    return turn, mask


def test_spec_example_by_hand():
    # one group of 3 (alpha 0.5, gamma 1): returns G0 = [1.5, 0.5, 0]
    R = torch.tensor([1.0, 0.0, 0.0])
    ks = torch.tensor([0, 1, -1])
    K = torch.tensor([2, 3, 1])
    gid = torch.tensor([42, 42, 42])
    turn, mask = _layout(K.tolist(), 20)
    G = [[1.5, 1.0], [0.5, 0.5, 0.0], [0.0]]
    mu, sd = statistics.mean([1.5, 0.5, 0.0]), statistics.stdev([1.5, 0.5, 0.0])
    for backend in ("triton", "reference"):
        tok, A = tk.turn_advantages(R, ks, K, gid, turn, mask, backend=backend)
        assert A.shape == (3, 3)
        for b in range(3):
            for k in range(3):
                want = (G[b][k] - mu) / (sd + 1e-6) if k < K[b] else 0.0
                assert A[b, k].item() == pytest.approx(want, rel=1e-5, abs=1e-6)
        # broadcast to loss-masked tokens of each turn, zero elsewhere
        want_tok = torch.where(mask, A.gather(1, turn.long().clamp(min=0)), torch.zeros(()))
        assert torch.equal(tok, want_tok)


def test_grpo_mode_is_outcome_only():
    R = torch.tensor([1.0, 0.0, 0.0, 1.0])
    ks = torch.tensor([0, 0, -1, 1])
    K = torch.tensor([2, 3, 1, 2])
    turn, mask = _layout(K.tolist(), 20)
    mu, sd = statistics.mean(R.tolist()), statistics.stdev(R.tolist())
    for backend in ("triton", "reference"):
        _, A = tk.turn_advantages(R, ks, K, torch.zeros(4, dtype=torch.long), turn, mask, mode="grpo", backend=backend)
        for b in range(4):
            assert A[b, : K[b]].tolist() == pytest.approx([(R[b].item() - mu) / (sd + 1e-6)] * int(K[b]), rel=1e-5)


def test_turn_norm_with_fallback_by_hand():
    # group of 3: turn 0 and 1 have 3 and 2 members, turn 2 has one -> group statistics
    R = torch.tensor([0.0, 1.0, 0.0])
    ks = torch.tensor([1, -1, 0])
    K = torch.tensor([3, 2, 1])
    turn, mask = _layout(K.tolist(), 24)
    G = [[0.5, 0.5, 0.0], [1.0, 1.0], [0.5]]
    g0 = [0.5, 1.0, 0.5]
    for backend in ("triton", "reference"):
        _, A = tk.turn_advantages(R, ks, K, torch.tensor([3, 3, 3]), turn, mask, norm="turn", backend=backend)
        for k, members in ((0, [0, 1, 2]), (1, [0, 1])):
            vals = [G[b][k] for b in members]
            for b in members:
                want = (G[b][k] - statistics.mean(vals)) / (statistics.stdev(vals) + 1e-6)
                assert A[b, k].item() == pytest.approx(want, rel=1e-5, abs=1e-6)
        want = (G[0][2] - statistics.mean(g0)) / (statistics.stdev(g0) + 1e-6)
        assert A[0, 2].item() == pytest.approx(want, rel=1e-5)


def _random_inputs(gen, B, L, T, gamma_nonbinary=True):
    sizes = []
    while sum(sizes) < B:
        sizes.append(int(torch.randint(1, 7, (1,), generator=gen)))
    gid = torch.repeat_interleave(torch.randint(0, 2**40, (len(sizes),), generator=gen), torch.tensor(sizes))[:B]
    gid = gid[torch.randperm(B, generator=gen)]  # groups need not be contiguous
    K = torch.randint(0, T + 1, (B,), generator=gen)
    ks = torch.randint(-1, T + 1, (B,), generator=gen)  # includes "none" and k* >= K (ignored)
    R = torch.rand(B, generator=gen) if gamma_nonbinary else torch.randint(0, 2, (B,), generator=gen).float()
    turn = torch.randint(-1, T + 1, (B, L), generator=gen, dtype=torch.int32)
    mask = torch.rand(B, L, generator=gen) < 0.7
    return R, ks, K, gid, turn, mask


@pytest.mark.parametrize("B,L,T", [(1, 1, 1), (1, 50, 4), (13, 97, 5), (40, 515, 3), (70, 33, 7)])
@pytest.mark.parametrize("mode,norm", [("tspo", "group"), ("tspo", "turn"), ("grpo", "group")])
def test_kernel_matches_reference_random(B, L, T, mode, norm):
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    R, ks, K, gid, turn, mask = _random_inputs(gen, B, L, T, gamma_nonbinary=bool(B % 2))
    alpha = float(torch.rand(1, generator=gen))
    gamma = [1.0, 0.9, 0.0][B % 3]
    T_out = max(int(K.max()), 1)
    poison = (torch.full((B, L), float("nan")), torch.full((B, T_out), float("nan")))
    got = _turn_advantages_triton(R, ks, K, gid, turn, mask, alpha=alpha if mode == "tspo" else 0.0,
                                  gamma=gamma if mode == "tspo" else 1.0, norm=norm if mode == "tspo" else "group",
                                  eps=1e-6, T=T_out, block_b=32, block_l=64, out=poison)
    want = ref.turn_advantages(R, ks, K, gid, turn, mask, alpha=alpha, gamma=gamma, mode=mode, norm=norm)
    assert not torch.isnan(got[0]).any() and not torch.isnan(got[1]).any()
    _assert_both_close(got, want, R, ks, K, gid, turn, mask, alpha=alpha, gamma=gamma)


def test_public_dispatch_and_max_turns():
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    R, ks, K, gid, turn, mask = _random_inputs(gen, 9, 40, 3)
    a = tk.turn_advantages(R, ks, K, gid, turn, mask, backend="triton", max_turns=6)
    b = tk.turn_advantages(R, ks, K, gid, turn, mask, max_turns=6)  # auto -> reference on CPU
    assert a[1].shape == (9, 6) and b[1].shape == (9, 6)
    _assert_both_close(a, b, R, ks, K, gid, turn, mask, alpha=0.5, gamma=1.0)
    assert (a[1][:, 4:] == 0).all()


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("norm", ["group", "turn"])
def test_all_equal_rewards_give_zero_advantages(backend, norm):
    # every member found the answer in turn 0, none answered right, all took 3 turns
    B = 5
    R, ks, K = torch.zeros(B), torch.zeros(B, dtype=torch.long), torch.full((B,), 3)
    turn, mask = _layout(K.tolist(), 30)
    for gamma in (1.0, 0.7):
        tok, A = tk.turn_advantages(R, ks, K, torch.zeros(B, dtype=torch.long), turn, mask, norm=norm, gamma=gamma,
                                    backend=backend)
        assert torch.count_nonzero(A) == 0 and torch.count_nonzero(tok) == 0


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_group_of_one_uses_mean_zero_std_one(backend):
    R, ks, K = torch.tensor([1.0, 0.0]), torch.tensor([0, -1]), torch.tensor([2, 1])
    turn, mask = _layout([2, 1], 16)
    _, A = tk.turn_advantages(R, ks, K, torch.tensor([1, 2]), turn, mask, backend=backend)
    assert A[0, :2].tolist() == pytest.approx([1.5 / (1 + 1e-6), 1.0 / (1 + 1e-6)])
    assert A[1, 0].item() == pytest.approx(0.0)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_failed_group_still_carries_signal(backend):
    # FOLR's point: all outcomes 0, but two members retrieved the answer -> non-zero advantages
    R = torch.zeros(4)
    ks = torch.tensor([1, -1, 0, -1])
    K = torch.tensor([3, 3, 2, 1])
    turn, mask = _layout(K.tolist(), 30)
    _, A_grpo = tk.turn_advantages(R, ks, K, torch.zeros(4, dtype=torch.long), turn, mask, mode="grpo", backend=backend)
    _, A = tk.turn_advantages(R, ks, K, torch.zeros(4, dtype=torch.long), turn, mask, backend=backend)
    assert torch.count_nonzero(A_grpo) == 0
    assert A[0, 0] > 0 and A[0, 1] > 0 and A[1, 0] < 0 and A[2, 0] > 0


def test_bad_inputs_raise_clear_errors():
    R, ks, K, gid = torch.zeros(3), torch.zeros(3, dtype=torch.long), torch.ones(3, dtype=torch.long), torch.zeros(3, dtype=torch.long)
    turn, mask = _layout([1, 1, 1], 10)
    with pytest.raises(ValueError, match="first_turn has shape"):
        tk.turn_advantages(R, ks[:2], K, gid, turn, mask)
    with pytest.raises(ValueError, match="turn_id has 2 rows"):
        tk.turn_advantages(R, ks, K, gid, turn[:2], mask[:2])
    with pytest.raises(ValueError, match="loss_mask has shape"):
        tk.turn_advantages(R, ks, K, gid, turn, mask[:, :5])
    with pytest.raises(TypeError, match="outcome has dtype int64"):
        tk.turn_advantages(R.long(), ks, K, gid, turn, mask)
    with pytest.raises(TypeError, match="turn_id has dtype float32"):
        tk.turn_advantages(R, ks, K, gid, turn.float(), mask)
    with pytest.raises(ValueError, match="unknown mode 'ppo'"):
        tk.turn_advantages(R, ks, K, gid, turn, mask, mode="ppo")
    with pytest.raises(ValueError, match="unknown norm 'batch'"):
        tk.turn_advantages(R, ks, K, gid, turn, mask, norm="batch")
    with pytest.raises(ValueError, match="gamma"):
        tk.turn_advantages(R, ks, K, gid, turn, mask, gamma=1.5)
    with pytest.raises(TypeError, match="one device"):
        tk.turn_advantages(R, ks, K, gid.to("meta"), turn, mask)


@pytest.mark.gpu
def test_cuda_kernel_matches_reference():
    gen = torch.Generator().manual_seed(0)
    R, ks, K, gid, turn, mask = _random_inputs(gen, 1024, 4096, 5)
    cpu = ref.turn_advantages(R, ks, K, gid, turn, mask, norm="turn", gamma=0.9)
    cuda = tk.turn_advantages(*(x.cuda() for x in (R, ks, K, gid, turn, mask)), norm="turn", gamma=0.9)
    torch.testing.assert_close(cuda[0].cpu(), cpu[0], **TOL)
    with pytest.raises(TypeError, match="one device"):
        tk.turn_advantages(R.cuda(), ks, K, gid, turn, mask)


# --------------------------------------------------------------------------- tspo_stage (docs/algorithm.md §3)
def _mixed_inputs(gen, B, L, T):
    """Groups of 5 with binary outcomes, some groups all-fail / all-success, plus a NaN-free F1-like group."""
    R, ks, K, gid, turn, mask = _random_inputs(gen, B, L, T, gamma_nonbinary=False)
    g = torch.unique(gid)
    for i, gg in enumerate(g.tolist()):
        rows = gid == gg
        if i % 3 == 0:
            R[rows] = 0.0                      # all fail: FOLR is the only contrast left
        elif i % 3 == 1:
            R[rows] = 1.0                      # all succeed
    return R, ks, K, gid, turn, mask


@pytest.mark.parametrize("B,L,T", [(1, 7, 2), (23, 61, 4), (64, 130, 5)])
@pytest.mark.parametrize("norm", ["group", "turn"])
def test_stage_kernel_matches_reference_random(B, L, T, norm):
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    R, ks, K, gid, turn, mask = _mixed_inputs(gen, B, L, T)
    gamma = [1.0, 0.8][B % 2]
    T_out = max(int(K.max()), 1)
    poison = (torch.full((B, L), float("nan")), torch.full((B, T_out), float("nan")))
    got = _turn_advantages_triton(R, ks, K, gid, turn, mask, alpha=0.5, gamma=gamma, norm=norm, eps=1e-6,
                                  T=T_out, mode="tspo_stage", block_b=16, block_l=64, out=poison)
    want = ref.turn_advantages(R, ks, K, gid, turn, mask, alpha=0.5, gamma=gamma, mode="tspo_stage", norm=norm)
    assert not torch.isnan(got[0]).any() and not torch.isnan(got[1]).any()
    # values, and the same token layout as every other mode (turn k's advantage on the loss-masked
    # tokens of turn k): both checked by _assert_both_close
    _assert_both_close(got, want, R, ks, K, gid, turn, mask, alpha=0.5, gamma=gamma)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_stage_by_hand(backend):
    # group 7 (outcomes differ): GRPO on every turn; group 9 (all fail): TSPO with FOLR alpha
    R = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    ks = torch.tensor([0, 1, -1, 0, -1, 1])
    K = torch.tensor([2, 3, 1, 2, 2, 3])
    gid = torch.tensor([7, 7, 7, 9, 9, 9])
    turn, mask = _layout(K.tolist(), 24)
    tok, A = tk.turn_advantages(R, ks, K, gid, turn, mask, alpha=0.5, mode="tspo_stage", backend=backend)
    mu, sd = statistics.mean([1.0, 0.0, 0.0]), statistics.stdev([1.0, 0.0, 0.0])
    for b in range(3):
        assert A[b, : K[b]].tolist() == pytest.approx([(R[b].item() - mu) / (sd + 1e-6)] * int(K[b]), rel=1e-5)
    # group 9: returns G = [[0.5, 0], [0, 0], [0.5, 0.5, 0]] (alpha 0.5 up to k*), group norm over G[:, 0]
    G = [[0.5, 0.0], [0.0, 0.0], [0.5, 0.5, 0.0]]
    g0 = [0.5, 0.0, 0.5]
    mu9, sd9 = statistics.mean(g0), statistics.stdev(g0)
    for i, b in enumerate(range(3, 6)):
        want = [(G[i][k] - mu9) / (sd9 + 1e-6) for k in range(int(K[b]))]
        assert A[b, : K[b]].tolist() == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert torch.equal(tok, torch.where(mask, A.gather(1, turn.long().clamp(min=0)), torch.zeros(())))
    # F1 outcomes: "all equal" means exactly equal, 0.5 vs 0.5000001 is a mixed group
    R2 = torch.tensor([0.5, 0.5, 0.5000001], dtype=torch.float64)
    _, A2 = tk.turn_advantages(R2, torch.tensor([0, -1, -1]), torch.tensor([1, 1, 1]), torch.zeros(3, dtype=torch.long),
                               *_layout([1, 1, 1], 8), mode="tspo_stage", backend=backend)
    _, A2_grpo = tk.turn_advantages(R2, torch.tensor([0, -1, -1]), torch.tensor([1, 1, 1]),
                                    torch.zeros(3, dtype=torch.long), *_layout([1, 1, 1], 8), mode="grpo",
                                    backend=backend)
    assert torch.equal(A2, A2_grpo) and A2[2, 0] > 0


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("norm", ["group", "turn"])
def test_alpha_zero_reduces_tspo_and_stage_to_grpo_exactly(backend, norm):
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    R, ks, K, gid, turn, mask = _mixed_inputs(gen, 37, 50, 4)
    gid[:3], R[:3], K[:3], ks[:3] = -5, 0.0, 2, torch.tensor([0, -1, -1])   # an all-fail group with a FOLR hit
    gid[3:6], R[3:6], K[3:6] = -6, torch.tensor([1.0, 0.0, 1.0]), 1        # and a mixed one: GRPO is not all zero
    run = lambda **kw: tk.turn_advantages(R, ks, K, gid, turn, mask, alpha=0.0, gamma=1.0, backend=backend, **kw)
    grpo = run(mode="grpo")
    assert torch.count_nonzero(grpo[1]) > 0
    stage = run(mode="tspo_stage", norm=norm)
    assert torch.equal(stage[0], grpo[0]) and torch.equal(stage[1], grpo[1])
    if norm == "group":
        tspo = run(mode="tspo", norm="group")
        assert torch.equal(tspo[0], grpo[0]) and torch.equal(tspo[1], grpo[1])
    # with alpha > 0 the modes do differ (the test can fail)
    assert not torch.equal(tk.turn_advantages(R, ks, K, gid, turn, mask, alpha=0.5, mode="tspo_stage", norm=norm,
                                              backend=backend)[1], grpo[1])


def test_stage_is_registered_mode():
    assert "tspo_stage" in tk.ADV_MODES


# --------------------------------------------------------------------------- non-finite inputs, bad values
@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("mode,norm", [("tspo", "group"), ("tspo", "turn"), ("grpo", "group"), ("tspo_stage", "turn")])
def test_nan_outcome_stays_in_its_row(backend, mode, norm):
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    R, ks, K, gid, turn, mask = _mixed_inputs(gen, 20, 40, 3)
    K = K.clamp(min=1)
    bad = 4
    gid[: 6] = gid[0]                                    # row 4 shares its group with rows 0..5
    R_bad = R.clone()
    R_bad[bad] = float("nan")
    kw = dict(mode=mode, norm=norm, backend=backend, max_turns=3)
    tok, A = tk.turn_advantages(R_bad, ks, K, gid, turn, mask, **kw)
    assert torch.isnan(A[bad, : K[bad]]).all() and (A[bad, K[bad]:] == 0).all()
    assert torch.isnan(tok[bad][mask[bad] & (turn[bad] >= 0) & (turn[bad] < K[bad])]).all()
    keep = torch.arange(20) != bad
    assert not torch.isnan(A[keep]).any() and not torch.isnan(tok[keep]).any()
    # the other rows: as if the NaN row were absent
    tok2, A2 = tk.turn_advantages(R[keep], ks[keep], K[keep], gid[keep], turn[keep], mask[keep], **kw)
    sub = (R[keep], ks[keep], K[keep], gid[keep], turn[keep], mask[keep])
    _assert_both_close((tok[keep], A[keep]), (tok2, A2), *sub, alpha=0.5, gamma=1.0)
    R_inf = R.clone()
    R_inf[bad] = float("inf")
    _, A3 = tk.turn_advantages(R_inf, ks, K, gid, turn, mask, **kw)
    assert torch.isnan(A3[bad, : K[bad]]).all()
    _assert_adv_close(A3[keep], A2, *sub[:4], alpha=0.5, gamma=1.0)


@pytest.mark.parametrize("backend", ["triton", "torch", "reference"])
def test_negative_num_turns_rejected(backend):
    R, ks, gid = torch.zeros(3), torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long)
    turn, mask = _layout([1, 1, 1], 10)
    K = torch.tensor([1, -2, 1])
    for max_turns in (None, 3):
        with pytest.raises(ValueError, match=r"num_turns\[1\] = -2"):
            tk.turn_advantages(R, ks, K, gid, turn, mask, max_turns=max_turns, backend=backend)
    if backend != "reference":          # validate=False: the caller vouches; a negative K is no turns
        _, A = tk.turn_advantages(R, ks, K, gid, turn, mask, max_turns=3, validate=False, backend=backend)
        _, A0 = tk.turn_advantages(R, ks, K.clamp(min=0), gid, turn, mask, max_turns=3, backend=backend)
        assert torch.equal(A, A0)


def test_non_finite_options_rejected():
    R, ks, K, gid = torch.zeros(3), torch.zeros(3, dtype=torch.long), torch.ones(3, dtype=torch.long), torch.zeros(3, dtype=torch.long)
    turn, mask = _layout([1, 1, 1], 10)
    for kw, word in (({"alpha": float("inf")}, "alpha"), ({"alpha": float("nan")}, "alpha"),
                     ({"eps": float("nan")}, "eps"), ({"eps": 0.0}, "eps"), ({"gamma": float("nan")}, "gamma")):
        for backend in ("triton", "reference"):
            with pytest.raises(ValueError, match=word):
                tk.turn_advantages(R, ks, K, gid, turn, mask, backend=backend, **kw)


def test_large_batch_several_member_blocks():
    """B larger than the member block: the statistics loop over several blocks (and the token pass
    over several position blocks), every mode."""
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    R, ks, K, gid, turn, mask = _mixed_inputs(gen, 150, 300, 4)
    T_out = max(int(K.max()), 1)
    for mode, norm in (("tspo", "turn"), ("tspo_stage", "group"), ("grpo", "group")):
        got = _turn_advantages_triton(R, ks, K, gid, turn, mask, alpha=0.3, gamma=0.9, norm=norm, eps=1e-6,
                                      T=T_out, mode=mode, block_b=64, block_l=128, block_r=16)
        want = ref.turn_advantages(R, ks, K, gid, turn, mask, alpha=0.3, gamma=0.9, mode=mode, norm=norm)
        _assert_both_close(got, want, R, ks, K, gid, turn, mask, alpha=0.3, gamma=0.9)


# --------------------------------------------------------------------------- tspo_placebo (the control)
def _placebo_groups(gen, n_groups, size, T):
    """Groups of ``size`` rows with 1..T turns, all-fail or mixed outcomes, and some k*."""
    B = n_groups * size
    K = torch.randint(1, T + 1, (B,), generator=gen)
    ks = torch.where(torch.rand(B, generator=gen) < 0.4, torch.randint(0, T, (B,), generator=gen), -1)
    R = (torch.rand(B, generator=gen) < 0.3).float()
    gid = (torch.arange(B) // size) * 1009 + 7          # group ids that are not positions
    return R, ks, K, gid


@pytest.mark.parametrize("B,L,T", [(1, 5, 1), (15, 60, 4), (40, 200, 5)])
@pytest.mark.parametrize("norm", ["group", "turn"])
def test_placebo_kernel_matches_reference_random(B, L, T, norm):
    """Every backend moves the same bonuses (one draw) and then computes "tspo" on them."""
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    R, ks, K, gid, turn, mask = _random_inputs(gen, B, L, T)
    seed = random.randrange(2**62)
    kw = dict(alpha=0.4, gamma=1.0, mode="tspo_placebo", norm=norm, seed=seed, max_turns=max(int(K.max()), 1))
    got = tk.turn_advantages(R, ks, K, gid, turn, mask, backend="triton", **kw)
    want = tk.turn_advantages(R, ks, K, gid, turn, mask, backend="reference", **kw)
    moved = ref.placebo_first_turn(R, ks, K, gid, seed)
    _assert_both_close(got, want, R, moved, K, gid, turn, mask, alpha=0.4, gamma=1.0)
    by_def = ref.turn_advantages(R, moved, K, gid, turn, mask, alpha=0.4, gamma=1.0, mode="tspo", norm=norm,
                                 max_turns=kw["max_turns"])
    assert torch.equal(want[0], by_def[0]) and torch.equal(want[1], by_def[1])


def test_placebo_keeps_each_groups_number_of_bonuses_on_random_members_and_turns():
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    R, ks, K, gid = _placebo_groups(gen, 30, 5, 4)
    R[3] = float("nan")                                  # not a member: never chosen
    seed = random.randrange(2**62)
    moved = ref.placebo_first_turn(R, ks, K, gid, seed)
    member = torch.isfinite(R) & (K >= 1)
    hit = member & (ks >= 0) & (ks < K)
    for g in torch.unique(gid):
        rows = gid == g
        assert int((moved[rows] >= 0).sum()) == int(hit[rows].sum())
    assert not bool(((moved >= 0) & ~member).any()) and bool((moved < K).all())
    assert torch.equal(ref.placebo_first_turn(R, ks, K, gid, seed), moved)          # a function of the seed
    others = [ref.placebo_first_turn(R, ks, K, gid, seed + d) for d in (1, 2, 3)]
    assert any(not torch.equal(o, moved) for o in others)                           # that the seed moves


def test_placebo_draws_members_and_turns_uniformly():
    """One group of 5 with 2 first-occurrence turns, K = 4 everywhere: over 4,000 seeds each member
    is chosen 2/5 of the time and each turn drawn 1/4 of the time (within 6 binomial sd)."""
    R, ks, K = torch.zeros(5), torch.tensor([0, 3, -1, -1, -1]), torch.full((5,), 4)
    gid = torch.zeros(5, dtype=torch.long)
    n, base = 4000, random.randrange(2**40)
    member = torch.zeros(5)
    turns = torch.zeros(4)
    for s in range(n):
        moved = ref.placebo_first_turn(R, ks, K, gid, base + s)
        member += (moved >= 0).float()
        turns += torch.bincount(moved[moved >= 0], minlength=4).float()
    sd = (n * 0.4 * 0.6) ** 0.5
    assert ((member - n * 0.4).abs() < 6 * sd).all(), member
    sd_t = (2 * n * 0.25 * 0.75) ** 0.5
    assert ((turns - 2 * n * 0.25).abs() < 6 * sd_t).all(), turns


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_placebo_by_hand(backend):
    """An all-fail group with one first-occurrence turn: "tspo" credits the member that retrieved
    the answer; the placebo credits exactly one member too, at the turn it drew, and gives the
    group the same set of values (one bonus, the same statistics)."""
    R, ks, K = torch.zeros(5), torch.tensor([1, -1, -1, -1, -1]), torch.tensor([3, 3, 3, 3, 3])
    gid, (turn, mask) = torch.zeros(5, dtype=torch.long), _layout([3] * 5, 30)
    seed = random.randrange(2**62)
    kw = dict(alpha=0.5, norm="group", backend=backend, max_turns=3)
    _, A = tk.turn_advantages(R, ks, K, gid, turn, mask, mode="tspo", **kw)
    _, P = tk.turn_advantages(R, ks, K, gid, turn, mask, mode="tspo_placebo", seed=seed, **kw)
    moved = ref.placebo_first_turn(R, ks, K, gid, seed)
    (who,) = (moved >= 0).nonzero().flatten().tolist()
    k = int(moved[who])
    credited = P > 0
    assert credited[who, : k + 1].all() and not credited[who, k + 1:].any()
    assert int(credited.sum()) == k + 1 and not credited[torch.arange(5) != who].any()
    assert torch.allclose(P[who, 0], A[0, 0]) and torch.allclose(P[(who + 1) % 5, 0], A[1, 0])


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_placebo_alpha_zero_is_grpo(backend):
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    R, ks, K, gid, turn, mask = _mixed_inputs(gen, 30, 50, 4)
    gid[:3], R[:3] = -6, torch.tensor([1.0, 0.0, 1.0])                  # a mixed group: GRPO is not all zero
    run = lambda **kw: tk.turn_advantages(R, ks, K, gid, turn, mask, gamma=1.0, norm="group", backend=backend, **kw)
    grpo = run(mode="grpo", alpha=0.0)
    assert torch.count_nonzero(grpo[1]) > 0
    placebo = run(mode="tspo_placebo", alpha=0.0, seed=5)
    assert torch.equal(placebo[0], grpo[0]) and torch.equal(placebo[1], grpo[1])


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_placebo_nan_outcome_stays_in_its_row(backend):
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    R, ks, K, gid = _placebo_groups(gen, 4, 5, 3)
    turn, mask = _layout(K.tolist(), 40)
    bad = 2
    R[bad] = float("nan")
    tok, A = tk.turn_advantages(R, ks, K, gid, turn, mask, mode="tspo_placebo", seed=11, backend=backend, max_turns=3)
    assert torch.isnan(A[bad, : K[bad]]).all() and (A[bad, K[bad]:] == 0).all()
    keep = torch.arange(len(R)) != bad
    assert not torch.isnan(A[keep]).any() and not torch.isnan(tok[keep]).any()


def test_placebo_large_batch_several_member_blocks():
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    R, ks, K, gid, turn, mask = _mixed_inputs(gen, 150, 300, 4)
    moved = ref.placebo_first_turn(R, ks, K, gid, 99)
    T_out = max(int(K.max()), 1)
    got = _turn_advantages_triton(R, moved, K, gid, turn, mask, alpha=0.3, gamma=0.9, norm="turn", eps=1e-6,
                                  T=T_out, mode="tspo", block_b=64, block_l=128, block_r=16)
    want = ref.turn_advantages(R, ks, K, gid, turn, mask, alpha=0.3, gamma=0.9, mode="tspo_placebo", norm="turn",
                               seed=99)
    _assert_both_close(got, want, R, moved, K, gid, turn, mask, alpha=0.3, gamma=0.9)


def test_placebo_is_a_registered_mode_and_config_value():
    from tspo_fast.config import load_config
    assert "tspo_placebo" in tk.ADV_MODES
    assert load_config(None, ["advantage.mode=tspo_placebo"]).advantage.mode == "tspo_placebo"


@pytest.mark.parametrize("mode", tk.ADV_MODES)
def test_batch_advantages_from_a_config_are_k2_with_its_settings(mode):
    """The trainer's call (``batch_advantages`` with ``AdvantageSettings.from_config``) gives exactly
    K2's numbers for the config's settings and the step's seed, for every built-in mode."""
    from types import SimpleNamespace

    from tspo_fast.algo.advantages import AdvantageSettings, batch_advantages
    from tspo_fast.config import load_config

    gen = torch.Generator().manual_seed(random.randrange(2**31))
    R, ks, K, gid, turn, mask = _mixed_inputs(gen, 20, 40, 4)
    cfg = load_config(None, [f"advantage.mode={mode}", "advantage.norm=turn", "advantage.gamma=0.9",
                             "reward.folr_alpha=0.3", "rollout.max_turns=3"])
    batch = SimpleNamespace(num_turns=K, group_id=gid, turn_id=turn, loss_mask=mask)
    got = batch_advantages(batch, R, ks, AdvantageSettings.from_config(cfg, seed=1234))
    want = tk.turn_advantages(R, ks, K, gid, turn, mask, alpha=0.3, gamma=0.9, mode=mode, norm="turn", eps=1e-6,
                              max_turns=4, seed=1234)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
