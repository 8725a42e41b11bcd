"""K1 (first occurrence): Triton kernel (interpreter on CPU) vs the PyTorch reference."""
import random

import pytest
import torch

import tspo_kernels as tk
from tspo_kernels import reference as ref
from tspo_kernels.first_occurrence import _first_occurrence_triton

SOURCES = ["observation", "action", "any"]


def _trajectory_tensors(gen: torch.Generator, B: int, L: int, vocab: int):
    """Random rows laid out like rollouts: prompt (-1), then per turn an action and an observation."""
    ids = torch.randint(0, vocab, (B, L), generator=gen)
    turn = torch.full((B, L), -1, dtype=torch.int32)
    obs = torch.zeros(B, L, dtype=torch.bool)
    for b in range(B):
        t = int(torch.randint(0, max(L // 4, 1) + 1, (1,), generator=gen))
        k = 0
        end = int(torch.randint(t, L + 1, (1,), generator=gen))  # right padding after `end`
        while t < end:
            for is_o in (False, True):
                n = int(torch.randint(1, 9, (1,), generator=gen))
                turn[b, t:min(t + n, end)] = k
                obs[b, t:min(t + n, end)] = is_o
                t += n
                if t >= end:
                    break
            k += 1
    return ids, turn, obs


def _random_patterns(gen: torch.Generator, ids: torch.Tensor, max_variants: int, vocab: int):
    """Per row: some patterns cut from the row itself (so matches happen), some random, some empty."""
    B, L = ids.shape
    rows = []
    for b in range(B):
        row = []
        for _ in range(int(torch.randint(0, max_variants + 1, (1,), generator=gen))):
            m = int(torch.randint(0, 7, (1,), generator=gen))
            if torch.rand(1, generator=gen) < 0.6 and L > m:
                s = int(torch.randint(0, L - m + 1, (1,), generator=gen))
                row.append(ids[b, s:s + m].tolist())
            else:
                row.append(torch.randint(0, vocab, (m,), generator=gen).tolist())
        rows.append(row)
    return tk.pack_patterns(rows)


@pytest.mark.parametrize("B,L,vocab", [(1, 1, 3), (1, 37, 4), (7, 130, 5), (5, 1029, 8), (3, 2048, 3)])
@pytest.mark.parametrize("source", SOURCES)
def test_kernel_matches_reference_random(B, L, vocab, source):
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    ids, turn, obs = _trajectory_tensors(gen, B, L, vocab)
    pats = _random_patterns(gen, ids, 4, vocab)
    poisoned = (torch.full((B,), 123456789, dtype=torch.int64), torch.full((B,), -987654321, dtype=torch.int64))
    got = _first_occurrence_triton(ids, turn, obs, pats, source, out=poisoned)
    want = ref.first_occurrence(ids, turn, obs, pats, source)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    # result consistency: the match is where the reference says, in a segment of the selected kind
    for b in range(B):
        if want[0][b] >= 0:
            assert turn[b, want[1][b]] == want[0][b]


def test_block_smaller_than_row_and_int32_inputs():
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    ids, turn, obs = _trajectory_tensors(gen, 4, 301, 3)
    pats = _random_patterns(gen, ids, 3, 3)
    got = _first_occurrence_triton(ids.int(), turn, obs.to(torch.uint8), pats, "any", block_l=64)
    want = ref.first_occurrence(ids, turn, obs, pats, "any")
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def _row(segments):
    """Build one row from [(turn, is_obs, ids), ...]; turn -1 = prompt."""
    ids, turn, obs = [], [], []
    for k, o, toks in segments:
        ids += toks
        turn += [k] * len(toks)
        obs += [o] * len(toks)
    return (torch.tensor([ids]), torch.tensor([turn], dtype=torch.int32), torch.tensor([obs]))


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_segment_rules(backend):
    # prompt holds the answer (ignored); turn 0 action; turn 0 obs has it at its first token;
    ids, turn, obs = _row([(-1, False, [5, 6]), (0, False, [1, 5, 6]), (0, True, [5, 6, 9]), (1, False, [2]),
                           (1, True, [7, 5, 6])])
    pats = tk.pack_patterns([[[5, 6]]])
    assert tk.first_occurrence(ids, turn, obs, pats, "observation", backend=backend)[0].tolist() == [0]
    assert tk.first_occurrence(ids, turn, obs, pats, "observation", backend=backend)[1].tolist() == [5]
    assert tk.first_occurrence(ids, turn, obs, pats, "action", backend=backend)[1].tolist() == [3]
    assert tk.first_occurrence(ids, turn, obs, pats, "any", backend=backend)[1].tolist() == [3]
    # pattern at the very end of the row (segment edge)
    pats = tk.pack_patterns([[[7, 5, 6]]])
    assert tk.first_occurrence(ids, turn, obs, pats, backend=backend)[0].tolist() == [1]


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_pattern_crossing_a_segment_boundary_does_not_match(backend):
    # [3, 4] spans action -> observation of turn 0, and observation of turn 0 -> turn 1
    ids, turn, obs = _row([(0, False, [1, 3]), (0, True, [4, 3]), (1, True, [4, 8])])
    pats = tk.pack_patterns([[[3, 4]]])
    for source in SOURCES:
        t, p = tk.first_occurrence(ids, turn, obs, pats, source, backend=backend)
        assert (t.item(), p.item()) == (-1, -1)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_empty_rows_and_no_observation(backend):
    ids = torch.zeros(3, 10, dtype=torch.int64)
    turn = torch.full((3, 10), -1, dtype=torch.int32)
    turn[1, 2:] = 0  # row 1: one turn, action only
    obs = torch.zeros(3, 10, dtype=torch.bool)
    pats = tk.pack_patterns([[[0]], [[0], []], []])
    t, p = tk.first_occurrence(ids, turn, obs, pats, "observation", backend=backend)
    assert t.tolist() == [-1, -1, -1] and p.tolist() == [-1, -1, -1]
    t, p = tk.first_occurrence(ids, turn, obs, pats, "action", backend=backend)
    assert t.tolist() == [-1, 0, -1] and p.tolist() == [-1, 2, -1]
    # zero-length rows and zero rows
    pats0 = tk.pack_patterns([[[1]]])
    t, _ = tk.first_occurrence(torch.zeros(1, 0, dtype=torch.long), torch.zeros(1, 0, dtype=torch.int32),
                               torch.zeros(1, 0, dtype=torch.bool), pats0, backend=backend)
    assert t.tolist() == [-1]
    t, _ = tk.first_occurrence(torch.zeros(0, 5, dtype=torch.long), torch.zeros(0, 5, dtype=torch.int32),
                               torch.zeros(0, 5, dtype=torch.bool), tk.pack_patterns([]), backend=backend)
    assert t.numel() == 0


def test_pack_patterns_layout_and_errors():
    p = tk.pack_patterns([[[1, 2], [3]], [], [[4, 5, 6]]])
    assert p.ids.tolist() == [1, 2, 3, 4, 5, 6]
    assert p.offsets.tolist() == [0, 2, 3, 6]
    assert p.row_offsets.tolist() == [0, 2, 2, 3]
    assert p.max_len == 3 and p.num_rows == 3
    assert p.row(2) == [[4, 5, 6]]
    with pytest.raises(ValueError, match="negative"):
        tk.pack_patterns([[[1, -2]]])
    with pytest.raises(TypeError):
        tk.pack_patterns(torch.zeros(2, 2))


def test_bad_inputs_raise_clear_errors():
    ids = torch.zeros(2, 5, dtype=torch.long)
    turn = torch.zeros(2, 5, dtype=torch.int32)
    obs = torch.zeros(2, 5, dtype=torch.bool)
    pats = tk.pack_patterns([[[1]], [[2]]])
    with pytest.raises(ValueError, match="turn_id has shape"):
        tk.first_occurrence(ids, turn[:, :4], obs, pats)
    with pytest.raises(TypeError, match="token_ids has dtype float32"):
        tk.first_occurrence(ids.float(), turn, obs, pats)
    with pytest.raises(TypeError, match="is_obs has dtype"):
        tk.first_occurrence(ids, turn, obs.float(), pats)
    with pytest.raises(ValueError, match="patterns hold 1 rows"):
        tk.first_occurrence(ids, turn, obs, tk.pack_patterns([[[1]]]))
    with pytest.raises(ValueError, match="unknown source 'answer'"):
        tk.first_occurrence(ids, turn, obs, pats, "answer")
    with pytest.raises(ValueError, match="unknown backend"):
        tk.first_occurrence(ids, turn, obs, pats, backend="cuda")
    with pytest.raises(TypeError, match="PackedPatterns"):
        tk.first_occurrence(ids, turn, obs, [[1]])
    with pytest.raises(TypeError, match="one device"):
        tk.first_occurrence(ids, turn, obs.to("meta"), pats)


def test_answer_variants_spellings():
    # a byte-level tokenizer: ids are the UTF-8 bytes, so each variant is readable
    tok = lambda s: list(s.encode())
    texts = {bytes(v).decode() for v in tk.answer_variants(tok, ["The Who", "U.S.A."])}
    for want in ["The Who", " The Who", "the who", "THE WHO", "Who", " who", "U.S.A.", " U.S.A", "usa", "USA", " Usa"]:
        assert want in texts, want
    assert tk.answer_variants(tok, ["The", "  "]) == []  # normalise to "": never matchable
    with pytest.raises(TypeError):
        tk.answer_variants(tok, "Paris")


def test_answer_variants_accepts_hf_style_tokenizers():
    class HFLike:
        def encode(self, text, add_special_tokens=True):
            return ([0] if add_special_tokens else []) + list(text.encode())

    class Enc:  # tokenizers.Tokenizer-like: encode() returns an object with .ids
        def encode(self, text, add_special_tokens=True):
            return type("E", (), {"ids": list(text.encode())})()

    a = tk.answer_variants(HFLike(), ["Paris"])
    b = tk.answer_variants(Enc(), ["Paris"])
    assert a == b and [80, 97, 114, 105, 115] in a


# --------------------------------------------------------------------------- 2-D grid, prefilter, atomic minimum
@pytest.mark.parametrize("block_l,block_p", [(16, 2), (32, 4), (64, 8)])
@pytest.mark.parametrize("source", SOURCES)
def test_many_position_blocks_and_pattern_chunks(block_l, block_p, source):
    """Rows split over many position blocks (matches straddling block edges, several blocks with a
    match: the atomic minimum must pick the smallest key) and more patterns than one prefilter chunk."""
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    B, L, vocab = 6, 203, 4
    ids, turn, obs = _trajectory_tensors(gen, B, L, vocab)
    pats = _random_patterns(gen, ids, 11, vocab)
    got = _first_occurrence_triton(ids, turn, obs, pats, source, block_l=block_l, block_p=block_p)
    want = ref.first_occurrence(ids, turn, obs, pats, source)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_match_straddling_a_block_edge_and_later_smaller_turn():
    # turn ids need not grow along the row: the smallest turn wins even in a later block
    L = 40
    ids = torch.zeros(1, L, dtype=torch.long)
    turn = torch.full((1, L), -1, dtype=torch.int32)
    obs = torch.ones(1, L, dtype=torch.bool)
    turn[0, 10:20] = 3
    turn[0, 20:40] = 1
    ids[0, 14:17] = torch.tensor([7, 8, 9])      # turn 3, crosses the 16-position block edge
    ids[0, 30:33] = torch.tensor([7, 8, 9])      # turn 1, in a later block
    ids[0, 17] = 7                               # a first-token candidate that fails on its 2nd token
    pats = tk.pack_patterns([[[5, 5], [7, 8, 9]]])
    for block_l in (16, 64):
        t, p = _first_occurrence_triton(ids, turn, obs, pats, "observation", block_l=block_l)
        assert (t.item(), p.item()) == (1, 30)
    turn[0, 20:40] = 4
    t, p = _first_occurrence_triton(ids, turn, obs, pats, "observation", block_l=16)
    assert (t.item(), p.item()) == (3, 14)
    assert ref.first_occurrence(ids, turn, obs, pats)[1].item() == 14


def test_outputs_are_fresh_tensors_per_call():
    """The counters live in the output buffers: two calls must not share state."""
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    ids, turn, obs = _trajectory_tensors(gen, 5, 120, 3)
    pats = _random_patterns(gen, ids, 4, 3)
    a = _first_occurrence_triton(ids, turn, obs, pats, "any", block_l=32)
    b = _first_occurrence_triton(ids, turn, obs, pats, "any", block_l=32)
    want = ref.first_occurrence(ids, turn, obs, pats, "any")
    for got in (a, b):
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
