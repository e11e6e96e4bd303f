"""What the scheduler's managers share: `Queues` (the waiting queue, FIFO, whose front retracted and
requeued requests go back to; the running list, in admission order, the newest last; the keys of finished
requests whose state the ranks drop with the next step) and `Counters` (kept across restarts of the ranks)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from tandem.runtime.scheduling.request import Request


@dataclass
class Queues:
    waiting: deque[Request] = field(default_factory=deque)
    running: list[Request] = field(default_factory=list)
    released: list = field(default_factory=list)

    def unfinished(self) -> list[Request]:
        return list(self.waiting) + self.running

    def take_released(self) -> list:
        released, self.released = self.released, []
        return released


@dataclass
class Counters:
    preemptions: int = 0
    # prefix-cache lookups of first admissions (a request retried or resumed is not counted again)
    prefix_queries: int = 0
    prefix_query_tokens: int = 0
    prefix_hit_tokens: int = 0
