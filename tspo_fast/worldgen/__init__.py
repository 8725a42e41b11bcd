"""Builders of the bundled world (:mod:`tspo_fast.world` holds what they write):

* ``python -m tspo_fast.worldgen.generate``: the corpus and the questions (byte for byte);
* ``python -m tspo_fast.worldgen.warmstart --out DIR``: the tiny warm-start policy (``bundled:warmstart``);
* ``python -m tspo_fast.worldgen.smollm2_warmstart --out DIR``: SmolLM2-135M-Instruct's protocol warm-start
  adapter (``bundled:smollm2-warmstart``);
* ``python -m tspo_fast.worldgen.ceiling``: the test EM of an oracle that searches right and reads every answer.
"""
