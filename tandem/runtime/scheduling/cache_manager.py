"""`CacheManager`: the driver's bookkeeping of every stage's caches (pure Python; the tensors live on the ranks).

It owns the KV page ids, the linear-attention state slot ids and the radix prefix cache, and it is the only
place that takes, shares or frees them. Under pipeline parallelism every stage has the same number of pages
and slots (agreed at start-up), so one decision here is applied by every stage to its own pools through the
step messages (see `tandem.runtime.step`).

A request (`tandem.runtime.scheduling.scheduler.Request`) holds:
- `pages`: its page table; the first `tree_pages` entries lie on the radix-tree path it has locked
  (`lock_node`), the rest are its own. Where it computed a page the tree already held from another request
  (two requests prefilling the same tokens at once), its own copy stays its own: `duplicate_pages`.
- `state_slot`: its linear-attention state slot, in [0, max_running_requests). Snapshot slots of the cache
  are numbered after them.

With the radix cache, pages a request inserts become the tree's; unlocked tree pages are evicted (least
recently used first) whenever pages or snapshot slots run short."""

from __future__ import annotations

from tandem.runtime.scheduling.id_allocator import IdAllocator
from tandem.runtime.scheduling.radix_cache import MatchResult, RadixCache


class CacheManager:
    def __init__(self, max_total_tokens: int, page_size: int, max_running_requests: int, hybrid: bool,
                 radix_cache: bool):
        self.page_size = page_size
        self.max_total_tokens = max_total_tokens // page_size * page_size
        self.num_pages = max_total_tokens // page_size
        self.max_running_requests = max_running_requests
        self.hybrid = hybrid
        self.pages = IdAllocator(self.num_pages, "page")
        self.request_slots = IdAllocator(max_running_requests, "state slot")
        snapshots = max_running_requests if hybrid and radix_cache else 0
        self.snapshot_slots = IdAllocator(snapshots, "snapshot slot")  # slot id = max_running_requests + id
        self.radix = RadixCache(page_size, hybrid=hybrid) if radix_cache else None

    @property
    def num_state_slots(self) -> int:
        return self.request_slots.count + self.snapshot_slots.count

    # ---- pages --------------------------------------------------------------------------------------------
    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    @property
    def available_pages(self) -> int:
        """Free pages plus cached pages no running request uses (evictable)."""
        return self.pages.num_free + (self.radix.evictable_pages if self.radix else 0)

    @property
    def used_pages(self) -> int:
        """Pages holding KV: running requests' pages and the prefix cache's."""
        return self.pages.num_used

    def alloc_pages(self, n: int) -> list[int] | None:
        """n pages, evicting unlocked cached prefixes if needed; None (nothing taken) if they cannot be found."""
        short = n - self.pages.num_free
        if short > 0 and self.radix is not None:
            freed_pages, freed_slots = self.radix.evict(short)
            self._free_evicted(freed_pages, freed_slots)
        return self.pages.alloc(n)

    def _free_evicted(self, pages: list[int], slots: list[int]) -> None:
        self.pages.free(pages)
        self.snapshot_slots.free(s - self.max_running_requests for s in slots)

    # ---- the prefix cache ---------------------------------------------------------------------------------
    def match(self, token_ids: list[int]) -> MatchResult | None:
        """The longest cached prefix of token_ids (None without a radix cache). Counters are the caller's."""
        if self.radix is None:
            return None
        return self.radix.match_prefix(token_ids, count=False)

    def admit(self, req, match: MatchResult | None, num_tokens: int) -> bool:
        """Give `req` a state slot and pages for `num_tokens` tokens, reusing the matched prefix's pages
        (locked while it runs). False (nothing taken) when pages run short."""
        matched = list(match.page_ids) if match is not None else []
        if match is not None:
            self.radix.lock(match.node)
        new = self.alloc_pages(self.pages_for(num_tokens) - len(matched))
        if new is None:
            if match is not None:
                self.radix.unlock(match.node)
            return False
        req.state_slot = self.request_slots.alloc(1)[0]
        req.pages = matched + new
        req.tree_pages = len(matched)
        req.duplicate_pages = []
        req.lock_node = match.node if match is not None else None
        return True

    def snapshot_slot_of(self, match: MatchResult | None) -> int | None:
        """The state snapshot a hybrid hit resumes from (None: start from the zero state)."""
        if match is None or not self.hybrid or match.matched_len == 0:
            return None
        return match.node.state_slot

    def insert(self, req, num_tokens: int, snapshot: bool = False) -> int | None:
        """Cache the first `num_tokens` (a whole number of pages) of req's tokens with its pages; with
        `snapshot` (hybrid) also a snapshot of its state after exactly those tokens, in a fresh snapshot slot
        whose id is returned (the ranks copy the request's state into it after the step computing those
        tokens). Returns None when there is no snapshot to take."""
        ps = self.page_size
        num_pages = num_tokens // ps
        if self.radix is None or num_pages <= req.tree_pages:
            return None
        slot = None
        if snapshot:
            slot = self._snapshot_slot()
            if slot is None:
                return None  # no slot even after eviction: leave this prefix uncached
        result = self.radix.insert(req.all_ids[:num_pages * ps], req.pages[:num_pages], slot)
        # our pages at positions the tree already held from someone else stay ours (same content)
        req.duplicate_pages.extend(req.pages[req.tree_pages:result.cached_pages])
        self.radix.lock(result.node)
        if req.lock_node is not None:
            self.radix.unlock(req.lock_node)
        req.lock_node, req.tree_pages = result.node, num_pages
        if slot is not None and not result.state_slot_kept:
            self.snapshot_slots.free([slot - self.max_running_requests])
            return None
        return slot

    def _snapshot_slot(self) -> int | None:
        ids = self.snapshot_slots.alloc(1)
        if ids is None and self.snapshot_slots.count:
            freed_pages, freed_slots = self.radix.evict_state_slots(1)
            self._free_evicted(freed_pages, freed_slots)
            ids = self.snapshot_slots.alloc(1)
        return None if ids is None else self.max_running_requests + ids[0]

    def reset(self) -> None:
        """Forget everything (the ranks' pools are gone): every page and slot free, the prefix cache empty."""
        self.pages.reset()
        self.request_slots.reset()
        self.snapshot_slots.reset()
        if self.radix is not None:
            self.radix = RadixCache(self.page_size, hybrid=self.hybrid)

    # ---- release ------------------------------------------------------------------------------------------
    def release(self, req) -> None:
        """Free what `req` holds: its own pages, its duplicates, its state slot, its lock on the tree."""
        if req.state_slot is None:
            return
        self.pages.free(req.pages[req.tree_pages:] + req.duplicate_pages)
        if req.lock_node is not None:
            self.radix.unlock(req.lock_node)
        self.request_slots.free([req.state_slot])
        req.pages, req.tree_pages, req.duplicate_pages, req.lock_node, req.state_slot = [], 0, [], None, None
