"""``tspo-fast agreement``: how often K1 (token ids) agrees with FOLR's string rule."""
from ..algo.agreement import main

__all__ = ["main"]
