"""What the install requires: the GPU install resolves (torch and vLLM pinned to a pair that pip
can install together with the project's GPU extra: a ``pip install --dry-run`` against the
package index; no CUDA needed), DeepSpeed's floor is the one the trainer needs, checked again
at run time, and scripts/install.sh checks the NVIDIA driver that torch 2.11's CUDA 13.0 build needs."""
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


# ----------------------------------------------------------------------------- the NVIDIA driver
def _stand_in_bin(tmp_path, driver: str | None) -> dict:
    """A PATH whose ``nvidia-smi`` and ``python`` are stand-ins (this machine has no GPU, and a test
    installs nothing): nvidia-smi prints ``driver`` (or fails when None); python records its
    arguments and answers "no torch here" to ``import torch``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True)
    smi = bin_dir / "nvidia-smi"
    smi.write_text("#!/bin/sh\n" + (f"echo '{driver}'\n" if driver else "echo 'NVIDIA-SMI has failed' >&2; exit 9\n"))
    py = bin_dir / "python"
    py.write_text('#!/bin/sh\necho "$*" >> "$STAND_IN_LOG"\ncase "$*" in *"import torch"*) exit 1;; esac\nexit 0\n')
    for f in (smi, py):
        f.chmod(0o755)
    log = tmp_path / "python_calls.txt"
    log.write_text("")
    return dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", STAND_IN_LOG=str(log))


def _install(tmp_path, driver, *args):
    env = _stand_in_bin(tmp_path, driver)
    p = subprocess.run(["bash", str(Path(ROOT) / "scripts" / "install.sh"), *args], env=env, capture_output=True,
                       text=True, timeout=60)
    return p, (tmp_path / "python_calls.txt").read_text()


@pytest.mark.parametrize("driver", ["570.124.06", "580.65.05"])
def test_install_stops_on_a_driver_older_than_cuda_13s(tmp_path, driver):
    """torch 2.11.0 is a CUDA 13.0 build: a GPU machine whose driver is older than 580.65.06 is told
    so, naming both versions, before anything is installed."""
    p, calls = _install(tmp_path, driver)
    assert p.returncode == 1, p.stdout + p.stderr
    assert f"NVIDIA driver {driver} is older than 580.65.06" in p.stderr and "CUDA 13.0" in p.stderr
    assert "pip" not in calls
    p, _ = _install(tmp_path / "check", driver, "--check-driver")
    assert p.returncode == 1 and "older than 580.65.06" in p.stderr


def test_install_goes_on_with_a_cuda_13_driver(tmp_path):
    p, calls = _install(tmp_path, "580.159.04")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "NVIDIA driver 580.159.04: >= 580.65.06" in p.stdout
    assert "-m pip install torch==2.11.0" in calls and "-m pip install -e ." in calls
    p, calls = _install(tmp_path / "check", "580.159.04", "--check-driver")
    assert p.returncode == 0 and "pip" not in calls


def test_install_says_when_nvidia_smi_reports_no_driver(tmp_path):
    p, calls = _install(tmp_path, None, "--check-driver")
    assert p.returncode == 1 and "reports no driver version" in p.stderr and "580.65.06" in p.stderr
