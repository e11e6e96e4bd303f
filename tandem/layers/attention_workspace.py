"""`AttentionWorkspace`: reusable buffers for the keys and values decode attention gathers from the paged pool.

A fresh tensor of several megabytes per layer and step is slow on CPU: large allocations come straight from
the OS, and each of their pages faults when first written (decode attention measured ~3x slower than with a
reused buffer, bench/results/profile.md). A workspace keeps one buffer per name and hands out views of it,
growing it (at least doubling, up to `max_bytes` per buffer) when a bigger view is asked for."""

from __future__ import annotations

import math

import torch


class AttentionWorkspace:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._buffers: dict[str, torch.Tensor] = {}

    def view(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
        """An uninitialised contiguous tensor of `shape` backed by buffer `name` (valid until the next `view` of
        that name)."""
        numel, device = math.prod(shape), torch.device(device)
        buffer = self._buffers.get(name)
        if buffer is None or buffer.dtype != dtype or buffer.device != device or buffer.numel() < numel:
            grown = 2 * buffer.numel() if buffer is not None and buffer.dtype == dtype else 0
            size = max(numel, min(grown, self.max_bytes // dtype.itemsize))
            self._buffers.pop(name, None)
            buffer = None  # the old buffer is freed before its successor is allocated
            buffer = torch.empty(size, dtype=dtype, device=device)
            self._buffers[name] = buffer
        return buffer[:numel].view(shape)

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self._buffers.values())
