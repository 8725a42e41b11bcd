"""The algorithm on a rollout batch: rewards (EM/F1, FOLR via K1), advantage estimators (a
registry; K2), and the agreement study of K1 with the string rule (``agreement``)."""
from .advantages import ESTIMATORS, batch_advantages
from .rewards import OUTCOMES, exact_match, extract_answer, f1, first_occurrence_turn_text, first_turns, score_batch

__all__ = ["ESTIMATORS", "OUTCOMES", "batch_advantages", "exact_match", "extract_answer", "f1",
           "first_occurrence_turn_text", "first_turns", "score_batch"]
