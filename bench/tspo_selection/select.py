"""Apply the pre-registered selection rule (PROTOCOL.md) to a selection's ``compare.json``.

    python bench/tspo_selection/select.py runs/selection/compare.json

Rule, as written before the runs: the variant with the highest mean paired difference in final
test EM against GRPO over seeds 1-4; a tie (within 0.001) goes to the higher mean paired
difference in mean test EM over the evaluations after step 0, then to the smaller alpha.
Prints the ranking and the chosen variant's advantage settings.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from make_configs import VARIANTS

TIE = 0.001


def choose(pairs: dict) -> list:
    """Variant names, best first, by the rule."""
    names = [n for n in pairs if n in VARIANTS]
    best_final = max(pairs[n]["final"]["mean"] for n in names)
    tied = [n for n in names if best_final - pairs[n]["final"]["mean"] <= TIE]
    rest = sorted((n for n in names if n not in tied), key=lambda n: -pairs[n]["final"]["mean"])
    tied.sort(key=lambda n: (-pairs[n]["mean_of_evals"]["mean"], VARIANTS[n][2]))
    return tied + rest


def main(path: str) -> str:
    pairs = json.load(open(path))["paired"]
    ranking = choose(pairs)
    for n in ranking:
        f, m = pairs[n]["final"], pairs[n]["mean_of_evals"]
        print(f"{n:24s} final EM diff {f['mean']:+.4f} (wins {f['wins']}, losses {f['losses']})   "
              f"mean-of-evals diff {m['mean']:+.4f}")
    mode, norm, alpha = VARIANTS[ranking[0]]
    print(f"chosen: {ranking[0]}: advantage.mode={mode} advantage.norm={norm} reward.folr_alpha={alpha}")
    return ranking[0]


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/selection/compare.json")
