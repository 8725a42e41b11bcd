"""What the install requires: the GPU install resolves (torch and vLLM pinned to a pair that pip
can install together with the project's GPU extra: a ``pip install --dry-run`` against the
package index; no CUDA needed), and DeepSpeed's floor is the one the trainer needs, checked again
at run time."""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

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


# ----------------------------------------------------------------------------- DeepSpeed's floor
def test_setup_floor_is_the_trainers_deepspeed_floor():
    """setup.py asks for the DeepSpeed the update needs (managed_gradient_accumulation, 0.19.4)."""
    from tspo_fast.training.ppo import MIN_DEEPSPEED

    m = re.search(r'"deepspeed>=([0-9.]+)"', (Path(ROOT) / "setup.py").read_text())
    assert m is not None and m.group(1) == MIN_DEEPSPEED == "0.19.4"


def test_the_installed_deepspeed_has_the_key_the_update_sets():
    """The key the update's DeepSpeed config relies on is one DeepSpeed reads (fails when it goes away)."""
    from deepspeed.runtime import constants

    from tspo_fast.config import load_config
    from tspo_fast.training.ppo import ds_config

    assert constants.MANAGED_GRADIENT_ACCUMULATION in ds_config(load_config(None), 1)


def test_an_older_deepspeed_is_refused_naming_its_version(monkeypatch):
    """DeepSpeed < 0.19.4 ignores managed_gradient_accumulation without a word: the trainer refuses it."""
    import deepspeed

    from tspo_fast.config import load_config
    from tspo_fast.training.ppo import ds_config

    monkeypatch.setattr(deepspeed, "__version__", "0.18.3")
    with pytest.raises(RuntimeError, match=r"DeepSpeed 0\.18\.3 is installed; tspo-fast needs deepspeed>=0\.19\.4"
                                           r".*managed_gradient_accumulation"):
        ds_config(load_config(None), 1)
    monkeypatch.setattr(deepspeed, "__version__", "0.19.4")
    assert ds_config(load_config(None), 1)["managed_gradient_accumulation"] is False
