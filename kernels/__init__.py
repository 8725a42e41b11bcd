"""tspo_kernels: Triton kernels for turn-level, search-augmented RL (TSPO), with PyTorch
references.  Depends on torch and triton only, so it drops into other RL codebases.

K1  ``first_occurrence``      first turn whose observation (or action) spells a gold answer
K2  ``turn_advantages``       FOLR turn rewards -> discounted returns -> group-normalised advantages
K3  ``fused_linear_pg_loss``  LM head + clipped policy-gradient loss without (N, V) logits
    ``fused_linear_logprobs`` forward-only log-probs (pi_old, pi_ref)

Each public function takes ``backend="auto"``: Triton for CUDA tensors, the PyTorch
reference (``tspo_kernels.reference``) otherwise.  ``backend="triton"`` forces the kernel
(on CPU it needs ``TRITON_INTERPRET=1`` set before import).

Note: run from the repository root, this folder is also importable as ``kernels``, the name of an
unrelated PyPI package that transformers probes for (``is_kernels_available``).  It finds no
version here and leaves it alone; do not add a ``__version__`` to this module.
"""
from .text import answer_variants, normalize_answer
from .first_occurrence import PackedPatterns, first_occurrence, pack_patterns
from .advantages import turn_advantages
from .pg_loss import PGLossOutput, fused_linear_logprobs, fused_linear_pg_loss

__all__ = [
    "PackedPatterns",
    "answer_variants",
    "first_occurrence",
    "normalize_answer",
    "pack_patterns",
    "turn_advantages",
    "PGLossOutput",
    "fused_linear_logprobs",
    "fused_linear_pg_loss",
]
