"""Training entry point for launchers (the body is :mod:`tspo_fast.cli.train`).

    deepspeed tspo_fast/train.py --config configs/7b.yaml [--set advantage.mode=grpo ...] [--resume]
    torchrun --nproc_per_node 2 tspo_fast/train.py --config configs/tiny.yaml
    tspo-fast train --config configs/tiny.yaml
"""
import os
import sys

if __package__ in (None, ""):  # run as a script by the deepspeed launcher or torchrun: import the package
    here = os.path.dirname(os.path.abspath(__file__))   # from the repository root, not from this folder
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
    sys.path.insert(0, os.path.dirname(here))

from tspo_fast.cli import third_party_output

with third_party_output(debug="--debug" in sys.argv):       # DeepSpeed's log on stderr (see tspo_fast.cli)
    from tspo_fast.cli.train import main

if __name__ == "__main__":
    sys.exit(main(prog="train.py"))
