"""`AdmissionManager`: which waiting requests start running, by tokens (as mini-sglang's prefill manager).

FIFO, up to `max_running_requests` running: a request is admitted when the pages for its tokens not served
by the prefix cache, plus a decode reserve, fit in the free and evictable pages after the reserves of the
running requests; alone, a request only needs room for its tokens (it may then use the whole pool). The
decode reserve is `DECODE_RESERVE_RATIO` of its remaining new tokens: admission is optimistic, and the
preemption manager retracts requests when a decode finds no page.

A request whose prefix a running request is about to cache (they share at least
`IN_BATCH_MIN_SHARED_TOKENS` tokens, more than the cache holds of it) waits for it instead of computing the
same prefix again; for hybrid models that request is also told to snapshot its state where they part."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

from tandem.errors import ConfigError
from tandem.runtime.scheduling.cache_manager import CacheManager
from tandem.runtime.scheduling.constraint_hooks import ConstraintHooks
from tandem.runtime.scheduling.queues import Counters, Queues
from tandem.runtime.scheduling.radix_cache import MatchResult
from tandem.runtime.scheduling.request import Request, RequestLimits, shared_pages

logger = logging.getLogger("tandem")

DECODE_RESERVE_RATIO = 0.5
IN_BATCH_MIN_SHARED_TOKENS = 32


class AdmissionManager:
    def __init__(self, queues: Queues, cache: CacheManager, limits: RequestLimits, counters: Counters,
                 constraints: ConstraintHooks | None = None, finish: Callable[[Request, dict], None] | None = None):
        self.queues, self.cache, self.limits, self.counters = queues, cache, limits, counters
        self.constraints, self.finish = constraints, finish

    def admit(self) -> None:
        waiting, running = self.queues.waiting, self.queues.running
        i = 0
        while i < len(waiting) and len(running) < self.cache.max_running_requests:
            req = waiting[i]
            if not self._grammar_ready(req):  # waits for its grammar without holding up the others
                i += req in waiting
                continue
            admitted = self._try_admit(req)
            if admitted is None:  # waits for a running request to cache its prefix
                i += 1
                continue
            if not admitted:
                break  # no room: later requests do not overtake it
            del waiting[i]
            running.append(req)

    def _grammar_ready(self, req: Request) -> bool:
        """Whether req's grammar (if any) is compiled; a grammar that does not compile ends req (abort)."""
        if self.constraints is None or req.params.constraint is None:
            return True
        try:
            return self.constraints.ready(req)
        except ConfigError as exc:
            self.finish(req, {"type": "abort", "message": str(exc)})
            if req.on_update is not None:  # no step will report it: tell its owner now
                try:
                    req.on_update(req)
                except Exception:
                    logger.exception("on_update of request %s failed", req.rid)
            return False

    def _try_admit(self, req: Request) -> bool | None:
        ids = req.all_ids
        # prompt logprobs need every prompt token computed; at least one token is always computed
        key = [] if req.scores_prompt else ids[:-1]
        match = self.cache.match(key)
        if key and self._shares_pending_prefix(req, match.matched_len):
            return None
        if self.queues.running and not self._fits(req, match):
            return False
        if not self.cache.admit(req, match, key):
            return False
        if req.admissions == 0:
            req.cached_tokens = match.matched_len
            if self.cache.prefix_cache.keeps_prefixes:
                self.counters.prefix_queries += 1
                self.counters.prefix_query_tokens += len(req.prompt_ids)
                self.counters.prefix_hit_tokens += match.matched_len
        req.admissions += 1
        req.num_cached = req.num_planned = match.matched_len
        req.prefill_end = len(ids)
        return True

    def _fits(self, req: Request, match: MatchResult) -> bool:
        """Whether req's new pages and decode reserve fit next to the running requests' reserves."""
        cache, n = self.cache, req.num_tokens
        need = cache.pages_for(n) - match.matched_len // cache.page_size
        reserve = cache.pages_for(min(n + self._reserve_tokens(req), self.limits.max_len)) - cache.pages_for(n)
        committed = sum(self._future_pages(r) for r in self.queues.running)
        return cache.available_pages - cache.evictable_in(match) - committed >= need + reserve

    def _reserve_tokens(self, req: Request) -> int:
        remaining = min(req.params.max_new_tokens - len(req.output_ids), self.limits.max_len - req.num_tokens)
        return math.ceil(DECODE_RESERVE_RATIO * max(remaining, 0))

    def _future_pages(self, req: Request) -> int:
        """Pages a running request is expected to take beyond those it holds (its decode reserve)."""
        target = min(req.num_tokens + self._reserve_tokens(req), self.limits.max_len)
        return max(0, self.cache.pages_for(target) - len(req.cache.pages))

    def _shares_pending_prefix(self, req: Request, matched: int) -> bool:
        """Whether a running request is about to cache more of req's prefix than the cache holds now (and, for
        a hybrid model, has been asked to snapshot its state where their tokens part)."""
        if not self.cache.prefix_cache.keeps_prefixes:
            return False
        ps = self.cache.page_size
        ids = req.all_ids[:-1]
        for other in self.queues.running:
            if other.num_planned >= other.prefill_end:
                continue  # its prefill is planned: what it caches is in the tree already
            shared = shared_pages(ids, other.all_ids[:other.prefill_end], ps) * ps
            if shared < IN_BATCH_MIN_SHARED_TOKENS or shared <= matched:
                continue
            if not self.cache.hybrid:
                if other.cache.tree_pages * ps < shared:
                    return True
            elif other.num_planned < shared:
                self.cache.ask_snapshot(other.cache, shared)
                return True
        return False
