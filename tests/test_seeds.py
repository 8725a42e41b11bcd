"""Fresh random inputs that can be replayed (tests/conftest.py): every run draws a seed, or takes
TSPO_TEST_SEED; each test gets its own seed from it and its id, through the ``seed`` fixture and
the global generators; a failure names the run's seed and how to replay it."""
import os
import random
import subprocess
import sys

import conftest
import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_seed_fixture_and_the_global_generators_follow_the_test_id(request, seed):
    assert seed == conftest.seed_of(request.node.nodeid)
    assert random.random() == random.Random(seed).random()
    assert np.random.rand() == np.random.RandomState(seed).rand()
    assert torch.equal(torch.rand(3), torch.rand(3, generator=torch.Generator().manual_seed(seed)))


def test_seeds_differ_by_test_and_by_run(monkeypatch):
    a = conftest.seed_of("tests/test_x.py::test_a")
    assert a != conftest.seed_of("tests/test_x.py::test_b")
    assert 0 <= a < 2**31
    monkeypatch.setattr(conftest, "RUN_SEED", conftest.RUN_SEED + 1)
    assert conftest.seed_of("tests/test_x.py::test_a") != a


def test_a_failure_names_its_seed_and_replays_with_it(tmp_path):
    (tmp_path / "test_draw.py").write_text(
        "import random\n"
        "def test_draw(seed):\n"
        "    print('DRAW', seed, random.random())\n"
        "    assert False\n")

    def run(run_seed):
        env = dict(os.environ, TSPO_TEST_SEED=str(run_seed), PYTHONPATH=os.path.join(ROOT, "tests"))
        p = subprocess.run([sys.executable, "-m", "pytest", "-p", "conftest", "-s", "-p", "no:cacheprovider",
                            "--rootdir", str(tmp_path), str(tmp_path / "test_draw.py")],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 1, p.stdout[-2000:] + p.stderr[-2000:]
        draws = [line[line.index("DRAW"):] for line in p.stdout.splitlines() if "DRAW " in line]
        assert len(draws) == 1, p.stdout[-2000:]
        return draws[0], p.stdout

    first, out = run(123)
    assert "random inputs: TSPO_TEST_SEED=123" in out                            # the header
    assert "replay a failure with TSPO_TEST_SEED=123 python -m pytest 'test_draw.py::test_draw'" in out
    assert run(123)[0] == first                                                  # replayed exactly
    assert run(124)[0] != first                                                  # another run, other inputs
