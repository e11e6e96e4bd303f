"""`IdAllocator`: a free list of integer ids (KV page ids, linear-attention state slots).

Driver-side bookkeeping in pure Python, separate from the tensors that the ids index: under pipeline
parallelism the driver picks the ids once and every stage applies them to its own pool. Allocation is
all-or-nothing and first-in first-out over the free list, so the ids handed out are deterministic."""

from __future__ import annotations

from collections import deque


class IdAllocator:
    def __init__(self, count: int, what: str = "page"):
        if count < 0:
            raise ValueError(f"the number of {what}s must be >= 0, got {count}")
        self.count, self.what = count, what
        self._free: deque[int] = deque(range(count))
        self._in_use: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return len(self._in_use)

    def alloc(self, n: int) -> list[int] | None:
        """n ids, or None (and nothing taken) when fewer than n are free."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} {self.what}s")
        if n > len(self._free):
            return None
        ids = [self._free.popleft() for _ in range(n)]
        self._in_use.update(ids)
        return ids

    def free(self, ids) -> None:
        """Return ids to the free list. Freeing an id that is not allocated (twice, or never) is an error,
        raised before any id of the call is returned."""
        ids = list(ids)
        if len(set(ids)) != len(ids):
            raise ValueError(f"{self.what} ids freed twice in one call: {sorted(ids)}")
        stray = [i for i in ids if i not in self._in_use]
        if stray:
            raise ValueError(f"{self.what} ids {stray} are not allocated (double free or never allocated)")
        self._in_use.difference_update(ids)
        self._free.extend(ids)

    def is_allocated(self, i: int) -> bool:
        return i in self._in_use

    def reset(self) -> None:
        """Everything free again, in the initial order."""
        self._free = deque(range(self.count))
        self._in_use = set()
