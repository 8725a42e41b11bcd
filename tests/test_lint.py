"""ruff over the package, tests and benchmarks (its rules: pyproject.toml, [tool.ruff]); the same
check pre-commit runs (.pre-commit-config.yaml)."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_is_clean():
    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (it comes with the dev extra: bash scripts/install.sh cpu,dev)")
    out = subprocess.run([ruff, "check", "--output-format", "concise", "tspo_fast", "tspo_kernels", "tests", "bench"],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, f"ruff check found problems:\n{out.stdout}{out.stderr}"


def test_every_noqa_gives_its_reason():
    """A ``# noqa`` marker says why, beside it, in words (``# noqa: E402  (after ... is set)``)."""
    reason = re.compile(r"#\s*noqa(?::\s*[A-Z]+[0-9]+(?:\s*,\s*[A-Z]+[0-9]+)*)?(.*)$")
    bare = []
    for folder in ("tspo_fast", "tspo_kernels", "tests", "bench"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                m = reason.search(line)
                if m and not re.search(r"[a-z]{3,}", m.group(1)):
                    bare.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not bare, "noqa markers without a reason:\n" + "\n".join(bare)

if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))
