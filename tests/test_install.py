"""The GPU install resolves: torch and vLLM pinned to a pair that pip can install together with
the project's GPU extra (a ``pip install --dry-run`` against the package index; no CUDA needed)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _index_reachable(host: str = "pypi.org") -> bool:
    try:
        socket.create_connection((host, 443), timeout=5).close()
        return True
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_gpu_extra_resolves_with_its_torch(tmp_path):
    if not _index_reachable():
        pytest.skip("the package index is not reachable from this machine")
    report = tmp_path / "report.json"
    p = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                        "--report", str(report), "torch==2.11.0", f"{ROOT}[gpu]"],
                       capture_output=True, text=True, timeout=850)
    assert p.returncode == 0, p.stderr[-3000:]
    got = {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in json.loads(report.read_text())["install"]}
    assert got["torch"] == "2.11.0" and got["vllm"] == "0.26.0", {k: got.get(k) for k in ("torch", "vllm")}
    assert "flash-attn" not in got and "flash_attn" not in got          # no source-only package by default
    assert got["transformers"].startswith("5.")
