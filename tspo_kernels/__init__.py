"""tspo_kernels: Triton kernels for turn-level, search-augmented RL (TSPO), with PyTorch
references.  Depends on torch and triton only, so it drops into other RL codebases.

K1  ``first_occurrence``      first turn whose observation (or action) spells a gold answer
K2  ``turn_advantages``       FOLR turn rewards -> discounted returns -> group-normalised advantages
K3  ``fused_linear_pg_loss``  LM head + clipped policy-gradient loss without (N, V) logits
    ``fused_linear_logprobs`` forward-only log-probs (pi_old, pi_ref)

Each public function takes ``backend`` (one of :data:`BACKENDS`): "auto" runs Triton for CUDA
tensors and the PyTorch path otherwise; "triton" forces the kernel (on CPU it needs
``TRITON_INTERPRET=1`` set before import); "torch" the PyTorch path; "reference" the plain
math of ``tspo_kernels.reference``.  The formulas are those of the project's
``docs/algorithm.md`` (§2-§5).
"""
from ._checks import ADV_MODES, ADV_NORMS, BACKENDS, FOLR_SOURCES
from .advantages import turn_advantages
from .first_occurrence import PackedPatterns, first_occurrence, first_occurrence_of_aliases, pack_patterns
from .pg_loss import PGLossOutput, fused_linear_logprobs, fused_linear_pg_loss
from .text import alias_list, answer_variants, normalize_answer

__all__ = [
    "ADV_MODES",
    "ADV_NORMS",
    "BACKENDS",
    "FOLR_SOURCES",
    "alias_list",
    "first_occurrence_of_aliases",
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
