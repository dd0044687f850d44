"""Which KV cells of the unified cache are in use, mirrored from the scheduler's own calls into llama.cpp.

In a unified cache a cell may belong to several sequences: `llama_memory_seq_cp` shares a prefix's cells by
reference. The ledger gives every cell the scheduler causes to exist an id and counts the sequences holding it,
so `used` is exact for what the scheduler did (llama.cpp's answer to a decode stays the authority: a batch that
finds no room is answered 1 and nothing is applied; the scheduler then frees room and tries again).
"""

from __future__ import annotations

import itertools


class CellLedger:
    def __init__(self, n_cells: int) -> None:
        self.n_cells = n_cells
        self._refs: dict[int, int] = {}
        self._ids = itertools.count()

    @property
    def used(self) -> int:
        return len(self._refs)

    @property
    def free(self) -> int:
        return self.n_cells - len(self._refs)

    def grow(self, cells: list[int], n: int) -> None:
        """`n` new cells decoded for a sequence whose cells are `cells` (extended in place)."""
        for _ in range(n):
            cell = next(self._ids)
            self._refs[cell] = 1
            cells.append(cell)

    def share(self, source: list[int], n: int) -> list[int]:
        """The first `n` cells of `source`, now held by one more sequence (seq_cp of a prefix)."""
        shared = source[:n]
        for cell in shared:
            self._refs[cell] += 1
        return shared

    def truncate(self, cells: list[int], keep: int) -> None:
        """The sequence gives up every cell from `keep` on (seq_rm from a position; 0 forgets it all)."""
        for cell in cells[keep:]:
            left = self._refs[cell] - 1
            if left:
                self._refs[cell] = left
            else:
                del self._refs[cell]
        del cells[keep:]
