"""Write the pre-registered selection variants (bench/tspo_selection/PROTOCOL.md) as configs.

    python bench/tspo_selection/make_configs.py      # -> bench/tspo_selection/configs/*.yaml

Each variant is ``configs/tiny.yaml`` with its ``advantage`` and ``reward.folr_alpha`` changed;
everything else (world, warm start, budget, seeds' data order) is the shipped default's.
"""
import os

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")

VARIANTS = {f"{mode}_{norm}_a{str(alpha).replace('.', '')}": (mode, norm, alpha)
            for mode, norm in (("tspo", "group"), ("tspo", "turn"), ("tspo_stage", "turn"))
            for alpha in (0.25, 0.5, 1.0)}


def main() -> None:
    base = yaml.safe_load(open(os.path.join(ROOT, "configs", "tiny.yaml")))
    os.makedirs(OUT, exist_ok=True)
    for name, (mode, norm, alpha) in VARIANTS.items():
        cfg = yaml.safe_load(yaml.safe_dump(base))
        cfg["output_dir"] = f"runs/selection/{name}"
        cfg["advantage"].update(mode=mode, norm=norm)
        cfg["reward"]["folr_alpha"] = alpha
        with open(os.path.join(OUT, f"{name}.yaml"), "w") as f:
            f.write(f"# bench/tspo_selection/PROTOCOL.md variant: configs/tiny.yaml with advantage.mode={mode}, "
                    f"norm={norm}, folr_alpha={alpha}\n")
            yaml.safe_dump(cfg, f, sort_keys=False)
    grpo = yaml.safe_load(open(os.path.join(ROOT, "configs", "tiny_grpo.yaml")))
    grpo["output_dir"] = "runs/selection/grpo"
    with open(os.path.join(OUT, "grpo.yaml"), "w") as f:
        f.write("# bench/tspo_selection/PROTOCOL.md baseline: configs/tiny_grpo.yaml\n")
        yaml.safe_dump(grpo, f, sort_keys=False)


if __name__ == "__main__":
    main()
