"""Packed answer variants: the pattern input of K1 (first occurrence)."""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch


class PackedPatterns(NamedTuple):
    """Variable-length token patterns of every row, packed flat.

    ids          (P,)      int32  all pattern tokens, concatenated
    offsets      (NV + 1,) int32  pattern v is ``ids[offsets[v]:offsets[v+1]]``
    row_offsets  (B + 1,)  int32  row b owns patterns ``row_offsets[b]:row_offsets[b+1]``
    max_len      int              longest pattern (0 if none)
    """

    ids: torch.Tensor
    offsets: torch.Tensor
    row_offsets: torch.Tensor
    max_len: int

    @property
    def num_rows(self) -> int:
        return self.row_offsets.numel() - 1

    def to(self, device) -> "PackedPatterns":
        return PackedPatterns(self.ids.to(device), self.offsets.to(device), self.row_offsets.to(device), self.max_len)

    def row(self, b: int):
        """Row b's patterns as Python lists (for debugging and references)."""
        lo, hi = int(self.row_offsets[b]), int(self.row_offsets[b + 1])
        offs = self.offsets.tolist()
        ids = self.ids.tolist()
        return [ids[offs[v]:offs[v + 1]] for v in range(lo, hi)]


def pack_patterns(rows: Sequence[Sequence[Sequence[int]]], device: Optional[torch.device] = None) -> PackedPatterns:
    """Pack ``rows`` (per trajectory, a list of token-id lists) into :class:`PackedPatterns`.

    Empty patterns are kept (they never match).  Token ids must be non-negative ints.
    """
    if isinstance(rows, torch.Tensor):
        raise TypeError("rows must be a list (per row) of lists of token-id lists, not a tensor")
    ids, offsets, row_offsets = [], [0], [0]
    max_len = 0
    for b, row in enumerate(rows):
        for v, pattern in enumerate(row):
            pattern = [int(t) for t in pattern]
            if any(t < 0 for t in pattern):
                raise ValueError(f"rows[{b}][{v}] has a negative token id: {pattern}")
            ids.extend(pattern)
            offsets.append(len(ids))
            max_len = max(max_len, len(pattern))
        row_offsets.append(len(offsets) - 1)
    as_t = lambda x: torch.tensor(x, dtype=torch.int32, device=device)
    return PackedPatterns(as_t(ids), as_t(offsets), as_t(row_offsets), max_len)
