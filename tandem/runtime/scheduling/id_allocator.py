"""`IdAllocator`: a free list of integer ids (KV page ids, linear-attention state slots).

Driver-side bookkeeping in pure Python, separate from the tensors that the ids index: under pipeline
parallelism the driver picks the ids once and every stage applies them to its own pool. Allocation is
all-or-nothing and deterministic: freed ids are handed out again first (oldest freed first), then ids never
used yet, in order. Reusing first keeps the part of a pool ever touched as small as the most ids held at once
(a CPU pool's pages are only mapped when first written), and the never-used ids are a counter rather than a
list, so a pool of millions of pages costs nothing until they are used."""

from __future__ import annotations

from collections import deque


class IdAllocator:
    def __init__(self, count: int, what: str = "page"):
        if count < 0:
            raise ValueError(f"the number of {what}s must be >= 0, got {count}")
        self.count, self.what = count, what
        self.reset()

    @property
    def num_free(self) -> int:
        return self.count - self._fresh + len(self._free)

    @property
    def num_used(self) -> int:
        return len(self._in_use)

    def alloc(self, n: int) -> list[int] | None:
        """n ids, or None (and nothing taken) when fewer than n are free."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} {self.what}s")
        if n > self.num_free:
            return None
        ids = [self._free.popleft() for _ in range(min(n, len(self._free)))]
        fresh = n - len(ids)
        ids += range(self._fresh, self._fresh + fresh)
        self._fresh += fresh
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
        self._fresh = 0  # ids >= _fresh were never handed out
        self._free: deque[int] = deque()  # freed ids, oldest first
        self._in_use: set[int] = set()
