"""The device check's Python: what ``bench/device_check.sh`` runs on a lent GPU (H100 / H200).

``bash bench/device_check.sh --help`` says how to run it; the shell only collects the machine's
facts, installs the carried wheels and starts ``python -m device_check run --part PART``
(``bench/`` on ``PYTHONPATH``).  One module per concern:

* :mod:`device_check.budget`  - the two parts (kernels <= 540 s, trainer <= 300 s), their steps, each
  step's time limit and the estimate it is sized from;
* :mod:`device_check.runner`  - runs a part's steps under their limits, logs, records ``steps.txt``;
* :mod:`device_check.k3check` - K3 against the float64 reference on device tensors;
* :mod:`device_check.kgraph`  - device-side K1 / K2 times and the copy / product ceilings;
* :mod:`device_check.parse`   - reading what the steps wrote (junit, pytest-benchmark JSON, logs);
* :mod:`device_check.verdicts` - PASS / MISS per target;
* :mod:`device_check.summary` - ``summary.txt``: counts, tables, verdicts, step times;
* :mod:`device_check.env`     - the Python half of ``env.txt``.

Everything here also runs without CUDA (Triton's interpreter at small shapes, the update at tiny
shapes, the trainer on the CPU), so it is checked on CPU (tests/test_device_check.py).
"""
