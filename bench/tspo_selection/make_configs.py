"""Write the pre-registered selection variants (bench/tspo_selection/PROTOCOL.md) as configs.

    python bench/tspo_selection/make_configs.py      # -> bench/tspo_selection/configs/*.yaml

Each variant is ``configs/tiny.yaml`` with its ``advantage`` and ``reward.folr_alpha`` changed;
everything else (world, warm start, budget, seeds' data order) is the shipped default's.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from study_configs import load, write, write_arm

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")

VARIANTS = {f"{mode}_{norm}_a{str(alpha).replace('.', '')}": (mode, norm, alpha)
            for mode, norm in (("tspo", "group"), ("tspo", "turn"), ("tspo_stage", "turn"))
            for alpha in (0.25, 0.5, 1.0)}


def main(out: str = OUT) -> None:
    base = load("configs/tiny.yaml")
    for name, (mode, norm, alpha) in VARIANTS.items():
        write_arm(os.path.join(out, f"{name}.yaml"), base, f"runs/selection/{name}", mode, norm, alpha,
                  f"bench/tspo_selection/PROTOCOL.md variant: configs/tiny.yaml with advantage.mode={mode}, "
                  f"norm={norm}, folr_alpha={alpha}")
    grpo = load("configs/tiny_grpo.yaml")
    grpo["output_dir"] = "runs/selection/grpo"
    write(os.path.join(out, "grpo.yaml"), grpo, "bench/tspo_selection/PROTOCOL.md baseline: configs/tiny_grpo.yaml")


if __name__ == "__main__":
    main(*sys.argv[1:])
