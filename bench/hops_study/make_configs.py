"""Write the pre-registered arms of the hops study (bench/hops_study/PROTOCOL.md) as configs.

    python bench/hops_study/make_configs.py      # -> bench/hops_study/configs/*.yaml

Each arm is ``configs/hops.yaml`` with its ``advantage`` and ``reward.folr_alpha`` changed;
everything else (world, warm start, budget, the seeds' data order) is the same for every arm.
"""
import os

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")

#: arm -> (advantage.mode, advantage.norm, reward.folr_alpha)
ARMS = {"grpo": ("grpo", "group", 0.25), "tspo": ("tspo", "turn", 0.25), "tspo_stage": ("tspo_stage", "turn", 0.25),
        "tspo_placebo": ("tspo_placebo", "turn", 0.25)}


def main() -> None:
    base = yaml.safe_load(open(os.path.join(ROOT, "configs", "hops.yaml")))
    os.makedirs(OUT, exist_ok=True)
    for name, (mode, norm, alpha) in ARMS.items():
        cfg = yaml.safe_load(yaml.safe_dump(base))
        cfg["output_dir"] = f"runs/hops_study/{name}"
        cfg["advantage"].update(mode=mode, norm=norm)
        cfg["reward"]["folr_alpha"] = alpha
        with open(os.path.join(OUT, f"{name}.yaml"), "w") as f:
            f.write(f"# bench/hops_study/PROTOCOL.md arm {name}: configs/hops.yaml with advantage.mode={mode}, "
                    f"norm={norm}, folr_alpha={alpha}\n")
            yaml.safe_dump(cfg, f, sort_keys=False)


if __name__ == "__main__":
    main()
