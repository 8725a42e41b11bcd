"""docs/algorithm.md, config.py's defaults and the shipped configs say the same thing: every
"`section.field` (value)" the page writes is that field's default, the mode and norm the page marks
"(default)" are the defaults, and every shipped TSPO config uses the defaults' advantage setting
(the page's "What ships").  Text and dataclass checks only."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from tspo_fast.config import Config

ROOT = Path(__file__).resolve().parents[1]
PAGE = (ROOT / "docs" / "algorithm.md").read_text()
SHIPPED = ["tiny", "3b", "7b", "hops", "smollm2"]


def _default(dotted: str):
    obj = Config()
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def test_every_value_the_page_gives_is_the_default():
    found = re.findall(r"`([a-z_]+\.[a-z_]+)` \(([^)]+)\)", PAGE)
    assert len(found) >= 5, "the page no longer names config fields with their defaults"
    for field, text in found:
        value = _default(field)
        assert float(text) == pytest.approx(float(value)), f"docs/algorithm.md: `{field}` ({text}), config.py {value}"


def test_the_modes_marked_default_are_the_defaults():
    a = Config().advantage
    marked = re.findall(r"\*\*`(\w+)`\*\* with \*\*`(?:advantage\.)?norm: (\w+)`\*\* \(default\)", PAGE)
    assert marked == [(a.mode, a.norm)], marked


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_use_the_default_advantage_setting(name):
    raw = yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())
    d = Config()
    assert raw["advantage"]["mode"] == d.advantage.mode, name
    assert raw["advantage"]["norm"] == d.advantage.norm, name
    assert raw["reward"]["folr_alpha"] == d.reward.folr_alpha, name
    assert f"`configs/{name}.yaml`" in PAGE or f"`{name}.yaml`" in PAGE, f"'What ships' does not name {name}.yaml"

