"""`StateRows`: the rows of a per-slot state pool (Gated DeltaNet conv and recurrent states) that a step's
decode rows use, read and written back with as little copying as their slots allow.

The decode rows are taken in slot order (their inputs permuted, their outputs permuted back: small tensors).
When the sorted slots are one run of consecutive slots, which is the usual case (slots are handed out from
0 and reused), the pool rows are a plain slice: the kernels update them in place, nothing is copied. Otherwise
the rows are gathered with one `index_select` and written back run by run with `copy_` (on CPU both are
several times faster than advanced-index assignment or `index_copy_` for the 128 KB recurrent-state rows)."""

from __future__ import annotations

import torch


class StateRows:
    def __init__(self, slots: list[int], device):
        order = sorted(range(len(slots)), key=slots.__getitem__)
        sorted_slots = [slots[i] for i in order]
        self.num_rows = len(slots)
        self.runs: list[tuple[int, int, int]] = []  # (first row in slot order, first slot, length)
        for row, slot in enumerate(sorted_slots):
            if self.runs and slot == self.runs[-1][1] + self.runs[-1][2]:
                start_row, start_slot, length = self.runs[-1]
                self.runs[-1] = (start_row, start_slot, length + 1)
            else:
                self.runs.append((row, slot, 1))
        self.is_slice = len(self.runs) == 1
        self._order = self._inverse = None
        if order != list(range(len(slots))):
            self._order = torch.tensor(order, dtype=torch.long, device=device)
            inverse = [0] * len(order)
            for position, row in enumerate(order):
                inverse[row] = position
            self._inverse = torch.tensor(inverse, dtype=torch.long, device=device)
        self._index = None if self.is_slice else torch.tensor(sorted_slots, dtype=torch.long, device=device)

    def to_slot_order(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Per-row tensors [B, ...] in the caller's row order -> slot order."""
        if self._order is None:
            return tensors
        return tuple(t.index_select(0, self._order) for t in tensors)

    def from_slot_order(self, rows: torch.Tensor) -> torch.Tensor:
        """A per-row tensor in slot order -> the caller's row order."""
        return rows if self._inverse is None else rows.index_select(0, self._inverse)

    def read(self, pool: torch.Tensor) -> torch.Tensor:
        """The rows' states [B, ...] in slot order: a view of `pool` [slots, ...] when the slots are one run
        (updates land in the pool), else a gathered copy that `write` must put back."""
        if self.is_slice:
            start = self.runs[0][1]
            return pool[start:start + self.num_rows]
        return pool.index_select(0, self._index)

    def write(self, pool: torch.Tensor, rows: torch.Tensor) -> None:
        """Put rows that `read` returned (and the caller updated) back into `pool`."""
        if self.is_slice:
            return
        for row, slot, length in self.runs:
            pool[slot:slot + length].copy_(rows[row:row + length])
