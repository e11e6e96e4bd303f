"""`CacheManager`: the driver's bookkeeping of every stage's caches (pure Python; the tensors live on the ranks).

It owns the KV page ids, the linear-attention state slot ids and the prefix cache (a `RadixCache`, or the
`NaiveCache` that keeps nothing with `--disable-radix-cache`), and it is the only code that takes, shares or
frees them, and the only caller of the prefix cache. Under pipeline parallelism every stage has the same
number of pages and slots (agreed at start-up), so one decision here is applied by every stage to its own
pools through the step messages (see `tandem.runtime.step`).

An admitted request holds one `CacheHandle` (`tandem.runtime.scheduling.request`): its page table, the part
of it that lies on the radix-tree path it locked, its state slot (in [0, max_running_requests); snapshot
slots of the cache are numbered after them) and, for hybrid models, where its state starts and where it is
to be snapshotted.

Pages a request inserts become the cache's; unlocked cached pages are evicted (least recently used first)
whenever pages or snapshot slots run short."""

from __future__ import annotations

from tandem.runtime.scheduling.id_allocator import IdAllocator
from tandem.runtime.scheduling.naive_cache import NaiveCache
from tandem.runtime.scheduling.radix_cache import MatchResult, RadixCache
from tandem.runtime.scheduling.request import CacheHandle, Request

TRACK_INTERVAL = 256  # tokens between prefill state snapshots of hybrid models (SGLang's mamba_track_interval)


class CacheManager:
    def __init__(self, max_total_tokens: int, page_size: int, max_running_requests: int, hybrid: bool,
                 radix_cache: bool):
        self.page_size = page_size
        self.max_total_tokens = max_total_tokens // page_size * page_size
        self.num_pages = max_total_tokens // page_size
        self.max_running_requests = max_running_requests
        self.hybrid = hybrid
        self.radix_cache = radix_cache
        self.pages = IdAllocator(self.num_pages, "page")
        self.request_slots = IdAllocator(max_running_requests, "state slot")
        snapshots = max_running_requests if hybrid and radix_cache else 0
        self.snapshot_slots = IdAllocator(snapshots, "snapshot slot")  # slot id = max_running_requests + id
        # hybrid with a prefix cache: prefill snapshots at multiples of this (0: none), whole pages
        self.track_interval = max(1, TRACK_INTERVAL // page_size) * page_size if snapshots else 0
        self.prefix_cache = self._new_prefix_cache()

    def _new_prefix_cache(self) -> RadixCache | NaiveCache:
        return (RadixCache if self.radix_cache else NaiveCache)(self.page_size, hybrid=self.hybrid)

    @property
    def num_state_slots(self) -> int:
        return self.request_slots.count + self.snapshot_slots.count

    # ---- pages --------------------------------------------------------------------------------------------
    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    @property
    def available_pages(self) -> int:
        """Free pages plus cached pages no running request uses (evictable)."""
        return self.pages.num_free + self.prefix_cache.evictable_pages

    @property
    def used_pages(self) -> int:
        """Pages holding KV: running requests' pages and the prefix cache's."""
        return self.pages.num_used

    def alloc_pages(self, n: int) -> list[int] | None:
        """n pages, evicting unlocked cached prefixes if needed; None (nothing taken) if they cannot be found."""
        short = n - self.pages.num_free
        if short > 0:
            self._free_evicted(*self.prefix_cache.evict(short))
        return self.pages.alloc(n)

    def extend(self, handle: CacheHandle, n: int) -> bool:
        """n more pages at the end of a running request's table; False (nothing taken) when there are none."""
        pages = self.alloc_pages(n)
        if pages is None:
            return False
        handle.add_pages(pages)
        return True

    def _free_evicted(self, pages: list[int], slots: list[int]) -> None:
        self.pages.free(pages)
        self.snapshot_slots.free(s - self.max_running_requests for s in slots)

    # ---- admission ----------------------------------------------------------------------------------------
    def match(self, key: list[int]) -> MatchResult:
        """The longest cached prefix of `key` (nothing matched without a radix cache)."""
        return self.prefix_cache.match_prefix(key)

    def evictable_in(self, match: MatchResult) -> int:
        """Evictable pages that admitting with `match` would lock (they stop being available)."""
        return self.prefix_cache.unlocked_pages_on_path(match.node)

    def admit(self, req: Request, match: MatchResult, key: list[int]) -> bool:
        """Give `req` a state slot and pages for all its tokens, reusing the prefix `match` found for `key`
        (locked while it runs). False (nothing taken) when pages run short."""
        ids = req.all_ids
        self.prefix_cache.lock(match.node)
        new = self.alloc_pages(self.pages_for(len(ids)) - len(match.page_ids))
        if new is None:
            self.prefix_cache.unlock(match.node)
            return False
        pages = list(match.page_ids) + new
        req.cache = CacheHandle(self.request_slots.alloc(1)[0], pages, len(match.page_ids), match.node,
                                restore_from=self._snapshot_slot_of(match),
                                snapshot_points=self._snapshot_points(ids, key, match.matched_len),
                                unsent_pages=list(pages))
        return True

    def _snapshot_slot_of(self, match: MatchResult) -> int | None:
        """The state snapshot a hybrid hit resumes from (None: start from the zero state)."""
        if not self.hybrid or match.matched_len == 0:
            return None
        return match.node.state_slot

    def _snapshot_points(self, ids: list[int], key: list[int], matched: int) -> set[int]:
        """Hybrid: where a request snapshots its state. At the end of its prompt (page-aligned), where a
        same-prompt request can resume, and where its tokens leave the cached KV of earlier requests, so that
        later requests sharing that much resume there. None without snapshot slots (no prefix cache)."""
        if not self.snapshot_slots.count:
            return set()
        end = (len(ids) - 1) // self.page_size * self.page_size
        branch = self.prefix_cache.cached_len(key)
        return {p for p in (end, branch) if p > matched}

    def ask_snapshot(self, handle: CacheHandle, num_tokens: int) -> None:
        """Also snapshot the request's state after `num_tokens` tokens (where a waiting request resumes)."""
        handle.snapshot_points.add(num_tokens)

    # ---- what a planned step caches -----------------------------------------------------------------------
    def chunk_end(self, req: Request, end: int) -> int:
        """Where a prefill chunk from req.num_planned that could reach `end` ends: at the first snapshot point
        it would cross, and (hybrid, vLLM's "align" mode) at the last multiple of the tracking interval it
        reaches, so that long prompts snapshot their state every `track_interval` tokens or so."""
        start = req.num_planned
        points = [p for p in req.cache.snapshot_points if start < p < end]
        if self.track_interval:
            aligned = end // self.track_interval * self.track_interval
            if aligned > start:
                points.append(aligned)
        return min(points, default=end)

    def cache_chunk(self, req: Request, start: int, end: int) -> tuple[int, int] | None:
        """Cache what the planned chunk [start, end) of `req` computes (ranks run steps in order, so a later
        step always finds it written). Non-hybrid: the whole pages of a prefill chunk. Hybrid: a chunk that
        ends at a snapshot point or (prefill) at a multiple of the tracking interval caches its prefix and a
        snapshot of the state; a decode step (or the prompt's last chunk) that ends at a page boundary copies
        the state into the request's tracking slot, which the cache takes when the request ends (the prefix through its
        answer). Returns the (request slot, snapshot slot) copy the ranks make after the step, if any."""
        handle = req.cache
        if not self.hybrid:
            if start < req.prefill_end - 1:
                self._insert(req, end // self.page_size * self.page_size)
            return None
        if end in handle.snapshot_points or (self.track_interval and start < req.prefill_end
                                             and end % self.track_interval == 0):
            handle.snapshot_points.discard(end)
            return self._snapshot_into_cache(req, end)
        if self.track_interval and end >= req.prefill_end and end % self.page_size == 0:
            return self._track(handle, end)
        return None

    def cache_verify(self, req: Request, start: int) -> tuple[int, int] | None:
        """A verify span from `start` (speculative decoding) caches nothing: its drafts are not accepted yet.
        Its slot still holds the state after exactly `start` tokens while the span runs (a verify span only
        reads it; its commit comes with a later step), so a hybrid request at a page boundary copies that
        state into its tracking slot. Returns the copy the ranks make after the step, if any."""
        if self.hybrid and self.track_interval and start >= req.prefill_end and start % self.page_size == 0:
            return self._track(req.cache, start)
        return None

    def max_drafts(self, req: Request) -> int | None:
        """Hybrid with a prefix cache: the drafts a verify span from req.num_cached may carry so that, all
        accepted, the next span starts at the next page boundary, where the state can be tracked (states exist
        at accepted boundaries only); None: no limit."""
        if not (self.hybrid and self.track_interval):
            return None
        return (req.num_cached // self.page_size + 1) * self.page_size - req.num_cached - 1

    def trim(self, handle: CacheHandle, num_pages: int) -> bool:
        """Free the request's own pages past its first `num_pages` (rejected drafts' positions); True when
        some were freed (the ranks' page table must be cut the same way)."""
        if len(handle.pages) <= num_pages:
            return False
        if num_pages < handle.tree_pages:
            raise ValueError(f"cannot trim a page table to {num_pages} pages: its first {handle.tree_pages} "
                             f"are cached prefix pages")
        freed = handle.pages[num_pages:]
        del handle.pages[num_pages:]
        gone = set(freed)
        handle.unsent_pages = [p for p in handle.unsent_pages if p not in gone]
        self.pages.free(freed)
        return True

    def _snapshot_into_cache(self, req: Request, end: int) -> tuple[int, int] | None:
        """Cache req's first `end` tokens with a snapshot of its state after them (taken after this step)."""
        if end // self.page_size <= req.cache.tree_pages:
            return None
        slot = self._snapshot_slot()
        if slot is None:
            return None  # no slot even after eviction: leave this prefix uncached
        slot = self._insert(req, end, slot)
        return None if slot is None else (req.cache.state_slot, slot)

    def _track(self, handle: CacheHandle, end: int) -> tuple[int, int] | None:
        """Copy a decoding request's state after `end` tokens into its tracking slot (one per request,
        overwritten at each page boundary; SGLang's extra buffer)."""
        if handle.track_slot is None:
            handle.track_slot = self._snapshot_slot()
            if handle.track_slot is None:
                return None
        handle.track_end = end
        return handle.state_slot, handle.track_slot

    def _insert(self, req: Request, num_tokens: int, slot: int | None = None) -> int | None:
        """Cache the first `num_tokens` (a whole number of pages) of req's tokens with its pages; `slot`
        (hybrid) is a snapshot slot that holds (or will hold, once the step in flight ran) req's state after
        exactly those tokens: the cache takes it, or it is freed. Returns the slot when the cache took it."""
        handle = req.cache
        num_pages = num_tokens // self.page_size
        if num_pages <= handle.tree_pages:
            self._free_snapshot(slot)
            return None
        result = self.prefix_cache.insert(req.ids_between(0, num_pages * self.page_size),
                                          handle.pages[:num_pages], slot)
        # our pages at positions the tree already held from someone else stay ours (same content)
        handle.duplicate_pages.extend(handle.pages[handle.tree_pages:result.cached_pages])
        self.prefix_cache.lock(result.node)
        self.prefix_cache.unlock(handle.lock_node)
        handle.lock_node, handle.tree_pages = result.node, result.held_pages
        if not result.state_slot_kept:
            self._free_snapshot(slot)
            return None
        return slot

    def _free_snapshot(self, slot: int | None) -> None:
        if slot is not None:
            self.snapshot_slots.free([slot - self.max_running_requests])

    def _snapshot_slot(self) -> int | None:
        ids = self.snapshot_slots.alloc(1)
        if ids is None and self.snapshot_slots.count:
            self._free_evicted(*self.prefix_cache.evict_state_slots(1))
            ids = self.snapshot_slots.alloc(1)
        return None if ids is None else self.max_running_requests + ids[0]

    # ---- release ------------------------------------------------------------------------------------------
    def release(self, req: Request) -> None:
        """Leave req's computed tokens in the prefix cache (hybrid: through the last page boundary whose state
        its tracking slot holds), then free what it holds: its own pages, its duplicates, its state slot, its
        lock on the tree."""
        handle = req.cache
        if handle is None:
            return
        if not self.hybrid:
            self._insert(req, req.num_cached // self.page_size * self.page_size)
        elif handle.track_slot is not None:  # the prefix through its last page boundary, with that state
            self._insert(req, handle.track_end, handle.track_slot)
        self.pages.free(handle.pages[handle.tree_pages:] + handle.duplicate_pages)
        self.prefix_cache.unlock(handle.lock_node)
        self.request_slots.free([handle.state_slot])
        req.cache = None

    def reset(self, holders: list[Request]) -> None:
        """Forget everything (the ranks' pools are gone): `holders` (the admitted requests) hold nothing any
        more, every page and slot is free, the prefix cache is empty."""
        for req in holders:
            req.cache = None
        self.pages.reset()
        self.request_slots.reset()
        self.snapshot_slots.reset()
        self.prefix_cache = self._new_prefix_cache()
