"""The arms of a pre-registered study as configs: a shipped config with its advantage and FOLR weight
changed, everything else (world, warm start, budget, the seeds' data order) kept.

Used by ``bench/tspo_selection/make_configs.py`` and ``bench/hops_study/make_configs.py``.
"""
import os

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(config: str) -> dict:
    """``config`` (a path under the repository, e.g. ``configs/tiny.yaml``) as a dict."""
    with open(os.path.join(ROOT, config)) as f:
        return yaml.safe_load(f)


def write(path: str, cfg: dict, header: str) -> None:
    """``cfg`` as YAML to ``path``, after a one-line comment ``header``."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(f"# {header}\n")
        yaml.safe_dump(cfg, f, sort_keys=False)


def write_arm(path: str, base: dict, output_dir: str, mode: str, norm: str, alpha: float, header: str) -> None:
    """``base`` with ``advantage.mode/norm`` and ``reward.folr_alpha`` set and its own ``output_dir``,
    written to ``path``; ``base`` itself is not changed."""
    cfg = yaml.safe_load(yaml.safe_dump(base))
    cfg["output_dir"] = output_dir
    cfg["advantage"].update(mode=mode, norm=norm)
    cfg["reward"]["folr_alpha"] = alpha
    write(path, cfg, header)
