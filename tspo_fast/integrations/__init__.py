"""Adapters that plug TSPO (FOLR rewards, K2 turn advantages, K3 fused loss) into other RL
frameworks.  Each submodule imports its framework lazily or behind a guard:

* ``segments``  turn segmentation from a framework's action/observation token mask (torch only)
* ``trl``       ``TSPOGRPOTrainer``, a drop-in subclass of TRL's ``GRPOTrainer``
* ``verl``      the ``"tspo"`` advantage estimator and ``"tspo"`` reward managers for veRL
* ``openrlhf``  TSPO advantages for OpenRLHF's experience maker
"""
