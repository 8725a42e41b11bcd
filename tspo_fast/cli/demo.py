"""``tspo-fast demo``: FOLR rewards and turn advantages on one hand-made group of rollouts.

Five rollouts of one two-hop question all answer wrongly, so the outcome reward (EM) is 0
for every one and GRPO's advantages are all 0: the group teaches nothing.  Two of them did
retrieve the answer; FOLR credits the turn where it first appeared, and TSPO's turn-level
advantages separate good searches from bad ones.
"""
from __future__ import annotations

from typing import List

import torch

import tspo_kernels as tk

from ..algo.agreement import pad_segments, segment_row
from ..algo.rewards import first_occurrence_turn_text, first_turns, outcome_reward

QUESTION = "In which year was the founder of Velmora Records born?"
ALIASES = ["1952", "in 1952"]
OBS = "\n\n<information>{}</information>\n\n"
ROLLOUTS = [
    [("<think>Find the founder.</think>\n<search> Velmora Records founder </search>",
      OBS.format('Doc 1(Title: Velmora Records) Velmora Records was founded by Ana Kessel.\n')),
     ("<think>Now her birth year.</think>\n<search> Ana Kessel born </search>",
      OBS.format("Doc 1(Title: Ana Kessel) Ana Kessel (born 1952) is a producer.\n")),
     ("<think>She was born in 1951.</think>\n<answer> 1951 </answer>", None)],
    [("<think>Search.</think>\n<search> Velmora Records </search>",
      OBS.format("Doc 1(Title: Velmora) Velmora is a town.\n")),
     ("<think>I guess.</think>\n<answer> 1960 </answer>", None)],
    [("<think>Search both.</think>\n<search> founder of Velmora Records birth year </search>",
      OBS.format("Doc 1(Title: Ana Kessel) Ana Kessel, founder of Velmora Records, was born in 1952.\n")),
     ("<think>Answer.</think>\n<answer> Ana Kessel </answer>", None)],
    [("<think>I know it.</think>\n<answer> 1949 </answer>", None)],
    [("<search> records </search>", OBS.format("Doc 1(Title: Record) A record is a document.\n")),
     ("<search> music labels </search>", OBS.format("Doc 1(Title: Label) A label is a company.\n")),
     ("<answer> 1970 </answer>", None)],
]


def _byte_tokenizer(text: str) -> List[int]:
    return list(text.encode("utf-8"))


def run() -> None:
    tok = _byte_tokenizer
    ids_t, turn_t, obs_t = pad_segments([segment_row([], [a for a, _ in t], [o for _, o in t], tok) for t in ROLLOUTS])
    B = ids_t.shape[0]
    loss_mask = (turn_t >= 0) & ~obs_t
    outcome = torch.tensor([outcome_reward("".join(a for a, _ in t), ALIASES) for t in ROLLOUTS])
    k_star, _ = first_turns(ids_t, turn_t, obs_t, [ALIASES] * B, tok)
    k_text = [first_occurrence_turn_text([o for _, o in t], ALIASES) for t in ROLLOUTS]
    num_turns = torch.tensor([len(t) for t in ROLLOUTS])
    group = torch.zeros(B, dtype=torch.long)
    _, a_grpo = tk.turn_advantages(outcome, k_star, num_turns, group, turn_t, loss_mask, mode="grpo")
    _, a_tspo = tk.turn_advantages(outcome, k_star, num_turns, group, turn_t, loss_mask, mode="tspo")
    print(f"Question: {QUESTION}   gold: {ALIASES}")
    print("rollout  turns  EM  k*(tokens)  k*(text)  GRPO advantage per turn   TSPO advantage per turn")
    for b in range(B):
        K = int(num_turns[b])
        grpo, tspo = (" ".join(f"{x:+.2f}" for x in a[b, :K].tolist()) for a in (a_grpo, a_tspo))
        print(f"{b:>7}  {K:>5}  {outcome[b]:.0f}   {int(k_star[b]):>10}  {k_text[b]:>8}  {grpo:<24}  {tspo}")
    print("\nAll outcomes are 0: GRPO gives every token advantage 0.  TSPO credits the turns up to the"
          "\nfirst retrieval of the answer (rollouts 0 and 2) and pushes the others down.")



def main(argv=None) -> int:
    """``tspo-fast demo`` (no arguments)."""
    if argv:
        raise SystemExit(f"tspo-fast demo: takes no arguments, got {' '.join(argv)}")
    run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
