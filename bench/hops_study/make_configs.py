"""Write the pre-registered arms of the hops study (bench/hops_study/PROTOCOL.md) as configs.

    python bench/hops_study/make_configs.py      # -> bench/hops_study/configs/*.yaml

Each arm is ``configs/hops.yaml`` with its ``advantage`` and ``reward.folr_alpha`` changed;
everything else (world, warm start, budget, the seeds' data order) is the same for every arm.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from study_configs import load, write_arm

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")

#: arm -> (advantage.mode, advantage.norm, reward.folr_alpha)
ARMS = {"grpo": ("grpo", "group", 0.25), "tspo": ("tspo", "turn", 0.25), "tspo_stage": ("tspo_stage", "turn", 0.25),
        "tspo_placebo": ("tspo_placebo", "turn", 0.25)}


def main(out: str = OUT) -> None:
    base = load("configs/hops.yaml")
    for name, (mode, norm, alpha) in ARMS.items():
        write_arm(os.path.join(out, f"{name}.yaml"), base, f"runs/hops_study/{name}", mode, norm, alpha,
                  f"bench/hops_study/PROTOCOL.md arm {name}: configs/hops.yaml with advantage.mode={mode}, "
                  f"norm={norm}, folr_alpha={alpha}")


if __name__ == "__main__":
    main(*sys.argv[1:])
