"""Rewards: Search-R1 normalisation, answer extraction, EM/F1, FOLR's string rule."""
import pytest
import torch

from tspo_fast.algo import rewards as reward


@pytest.mark.parametrize("text,want", [
    ("The Beatles!", "beatles"),
    ("  an  Apple a day ", "apple day"),
    ("U.S.A.", "usa"),
    ("Theatre", "theatre"),          # articles only as whole words
    ("1,000", "1000"),
    ("Saint-Denis", "saintdenis"),
])
def test_normalize_answer(text, want):
    assert reward.normalize_answer(text) == want


def test_extract_answer_takes_the_last_and_strips():
    assert reward.extract_answer("<answer> a </answer> x <answer>\n Paris \n</answer>") == "Paris"
    assert reward.extract_answer("no answer here") is None
    assert reward.extract_answer("<answer>unclosed") is None
    assert reward.extract_answer(None) is None
    assert reward.extract_answer("<answer></answer>") == ""


def test_exact_match_and_f1():
    assert reward.exact_match("the Eiffel tower", ["Eiffel Tower", "Tour Eiffel"]) == 1.0
    assert reward.exact_match("Eiffel", ["Eiffel Tower"]) == 0.0
    assert reward.exact_match(None, ["x"]) == 0.0
    assert reward.f1("Eiffel", ["Eiffel Tower"]) == pytest.approx(2 * 1.0 * 0.5 / 1.5)
    assert reward.f1("Eiffel Tower Paris", ["tower eiffel"]) == pytest.approx(0.8)
    assert reward.f1("London", ["Paris", "paris city"]) == 0.0
    assert reward.f1(None, ["x"]) == 0.0


def test_outcome_reward():
    resp = "<think>x</think><search>q</search>...<answer> The Beatles </answer>"
    assert reward.outcome_reward(resp, ["Beatles"]) == 1.0
    assert reward.outcome_reward(resp, ["Beatles band"], "f1") == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="reward.outcome"):
        reward.outcome_reward(resp, ["x"], "bleu")


def test_first_occurrence_turn_text():
    obs = [None, "\n\n<information>Doc 1(Title: X) nothing</information>\n\n",
           "\n\n<information>Doc 1(Title: Y) the BEATLES were a band</information>\n\n", None]
    acts = ["<search> the beatles </search>", "<search> q </search>", "<search> r </search>", "<answer> b </answer>"]
    assert reward.first_occurrence_turn_text(obs, ["The Beatles"]) == 2
    assert reward.first_occurrence_turn_text(obs, ["Stones"]) == -1
    assert reward.first_occurrence_turn_text(obs, ["The Beatles"], action_texts=acts, source="action") == 0
    assert reward.first_occurrence_turn_text(obs, ["The Beatles"], action_texts=acts, source="any") == 0
    assert reward.first_occurrence_turn_text(obs, ["The", ""]) == -1   # empty after normalisation: ignored
    with pytest.raises(ValueError, match="folr_source"):
        reward.first_occurrence_turn_text(obs, ["x"], source="prompt")
    with pytest.raises(ValueError, match="needs action_texts"):
        reward.first_occurrence_turn_text(obs, ["x"], source="any")


def test_first_turns_on_token_ids_matches_string_rule():
    tok = lambda s: list(s.encode())  # byte-level tokenizer
    segs = [("<search> who </search>", False, 0), ("\n\n<information>Doc 1(Title: A) Bob met Paris.</information>", True, 0),
            ("<answer> Paris </answer>", False, 1)]
    ids, turn, obs = [], [], []
    for text, o, k in segs:
        t = tok(text)
        ids += t
        turn += [k] * len(t)
        obs += [o] * len(t)
    args = (torch.tensor([ids, ids]), torch.tensor([turn, turn], dtype=torch.int32), torch.tensor([obs, obs]))
    t, p = reward.first_turns(*args, [["paris"], ["Rome"]], tok)
    assert t.tolist() == [0, -1]
    assert bytes(ids[p[0]:p[0] + 6]).decode().strip() == "Paris"  # the " Paris" spelling starts first
    with pytest.raises(ValueError, match="aliases has 1 rows"):
        reward.first_turns(*args, [["paris"]], tok)
