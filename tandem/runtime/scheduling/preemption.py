"""`PreemptionManager`: pages for decoding requests, by retraction when none is left.

When a decode step finds no free (or evictable) page, the most recently admitted requests that are not in
flight are retracted: their computed pages enter the prefix cache (non-hybrid models), their pages and
state slot are freed and they go back to the front of the waiting queue, to resume later by prefilling
their prompt plus the tokens generated so far. The oldest running request therefore always makes progress."""

from __future__ import annotations

from tandem.runtime.scheduling.cache_manager import CacheManager
from tandem.runtime.scheduling.queues import Counters, Queues
from tandem.runtime.scheduling.request import Request


class PreemptionManager:
    def __init__(self, queues: Queues, cache: CacheManager, counters: Counters, constraints=None):
        self.queues, self.cache, self.counters = queues, cache, counters
        self.constraints = constraints  # ConstraintHooks or None

    def ensure_page(self, req: Request, busy, tokens: int | None = None) -> bool:
        """A page for req's next token (or, given `tokens`, pages for its first `tokens` tokens), retracting the
        newest running requests if none is left. False when req itself was retracted or only busy requests
        hold pages."""
        tokens = req.num_cached + 1 if tokens is None else tokens
        while len(req.cache.pages) * self.cache.page_size < tokens:
            if self.cache.extend(req.cache, 1):
                continue
            victim = next((r for r in reversed(self.queues.running) if r.rid not in busy), None)
            if victim is None:
                return False
            self.retract(victim)
            if victim is req:
                return False
        return True

    def retract(self, req: Request) -> None:
        self.queues.running.remove(req)
        self.cache.release(req)
        req.forget_progress()
        if self.constraints is not None:
            self.constraints.reset(req)  # rebuilt from its output tokens when it runs again
        self.queues.waiting.appendleft(req)
        self.counters.preemptions += 1
