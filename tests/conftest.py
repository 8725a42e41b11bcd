"""Test-wide setup.

TRITON_INTERPRET must be set before any ``@triton.jit`` function is defined, so it is set
here, before the kernels package is imported: on a CPU machine the Triton kernels then run
in Triton's interpreter and are compared with the PyTorch references.

On a machine with a CUDA device the interpreter stays off (unless TRITON_INTERPRET=1 is set by
hand), so the compiled kernels are what the tests check.  The tests build their inputs on the
CPU, which a compiled kernel cannot read; so there every Triton kernel launch, whichever
launcher makes it, runs on GPU copies of its CPU tensor arguments, and what the kernel wrote
comes back to the CPU tensors (``tests/_device_harness.py``; ``tests/test_device_harness.py``
checks on CPU that every kernel path reaches it).  Launches whose tensors are already on the GPU
(the ``gpu``-marked tests) go straight through.
"""
import hashlib
import os
import random
import secrets

import numpy as np
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402  (after TRITON_INTERPRET is set: pytest's plugins may import triton)

# Fresh random inputs that can be replayed.  Each run draws one seed (or takes TSPO_TEST_SEED);
# every test gets its own seed, derived from the run's seed and the test's id: the ``seed``
# fixture, and Python's, NumPy's and torch's global generators, seeded before each test.  The
# run's seed is printed in the header and after any failure, so that
#     TSPO_TEST_SEED=<seed> python -m pytest '<test id>'
# gives that test the very inputs it failed on.
RUN_SEED = int(os.environ.get("TSPO_TEST_SEED") or secrets.randbelow(2**31))
# the run's workers (pytest-xdist) start from this process's environment: they share its seed
os.environ["TSPO_TEST_SEED"] = str(RUN_SEED)

#: at most this many test workers (``-n auto``): each may hold a vLLM engine and a DeepSpeed run
MAX_WORKERS = 4


def seed_of(test_id: str) -> int:
    """The seed of one test in this run (31 bits)."""
    return int.from_bytes(hashlib.sha256(f"{RUN_SEED}:{test_id}".encode()).digest()[:4], "little") >> 1


COMPILED_KERNELS = HAS_CUDA and os.environ.get("TRITON_INTERPRET", "0").lower() not in ("1", "true", "on", "yes")


if COMPILED_KERNELS:
    from _device_harness import LaunchRouter

    #: every Triton launch of the run gets GPU copies of its CPU tensors (tests/_device_harness.py)
    LAUNCH_ROUTER = LaunchRouter("cuda").install()


def pytest_xdist_auto_num_workers(config):
    """``-n auto``: one worker per CPU this process may use, at most MAX_WORKERS."""
    return max(1, min(MAX_WORKERS, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def pytest_report_header(config):
    seeds = f"random inputs: TSPO_TEST_SEED={RUN_SEED}"
    if HAS_CUDA:
        mode = "compiled (every launch runs CPU-built inputs on the GPU)" if COMPILED_KERNELS else "interpreter"
        return [f"tspo_kernels: CUDA device {torch.cuda.get_device_name()}; Triton kernels {mode}", seeds]
    return ["tspo_kernels: no CUDA device; Triton kernels run in the interpreter", seeds]


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    failed = terminalreporter.stats.get("failed", []) + terminalreporter.stats.get("error", [])
    if failed:
        terminalreporter.write_line(f"random inputs of this run: TSPO_TEST_SEED={RUN_SEED}; replay a failure with "
                                    f"TSPO_TEST_SEED={RUN_SEED} python -m pytest '{failed[0].nodeid}'")


@pytest.fixture
def seed(request) -> int:
    """This test's seed in this run: fresh every run, replayable with TSPO_TEST_SEED."""
    return seed_of(request.node.nodeid)


@pytest.fixture(autouse=True)
def _seed_global_generators(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; none is present")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
    # the slow tests first (stable: each group keeps its order): the workers then end the run on
    # short tests, together, instead of one waiting on the other's last long one
    items.sort(key=lambda item: "slow" not in item.keywords)


@pytest.fixture(scope="module")
def train_env(tmp_path_factory):
    """Environment for a trainer run in a fresh process, as a user's shell would give it: the
    package importable, one cache (``TSPO_FAST_CACHE`` if set), vLLM in-process with a small KV
    cache, no Triton interpreter (the trainer's CPU path is PyTorch) and no distributed variables
    left by in-process DeepSpeed tests (a fresh run picks its own free port)."""
    cache = os.environ.get("TSPO_FAST_CACHE") or str(tmp_path_factory.mktemp("cache"))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TSPO_FAST_CACHE=cache, PYTHONPATH=root, TOKENIZERS_PARALLELISM="false",
               VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1")
    env.pop("TRITON_INTERPRET", None)
    for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        env.pop(k, None)
    return env


@pytest.fixture
def device():
    """The device kernels run on: CUDA when present, else CPU (Triton interpreter)."""
    return torch.device("cuda" if HAS_CUDA else "cpu")
