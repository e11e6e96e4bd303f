"""`NaiveCache`: the prefix cache of `--disable-radix-cache`, which keeps nothing (as mini-sglang's naive
cache manager). It answers `RadixCache`'s calls the way an always-empty cache would, so that `CacheManager`
and the scheduler run one code path with the radix cache on or off: every lookup matches nothing, an
insert keeps none of its pages or snapshot (the request frees them itself), and there is nothing to lock
or evict."""

from __future__ import annotations

from tandem.runtime.scheduling.radix_cache import InsertResult, MatchResult


class NaiveCache:
    keeps_prefixes = False
    total_cached_pages = 0
    evictable_pages = 0
    num_state_slots = 0

    def __init__(self, page_size: int, hybrid: bool = False):
        self.page_size, self.hybrid = page_size, hybrid

    def match_prefix(self, token_ids) -> MatchResult:
        return MatchResult([], 0, None)

    def cached_len(self, token_ids) -> int:
        return 0

    def insert(self, token_ids, page_ids, state_slot: int | None = None) -> InsertResult:
        return InsertResult(0, False, None, 0)

    def lock(self, node) -> None:
        pass

    def unlock(self, node) -> None:
        pass

    def unlocked_pages_on_path(self, node) -> int:
        return 0

    def evict(self, num_pages: int) -> tuple[list[int], list[int]]:
        return [], []

    def evict_state_slots(self, num_slots: int) -> tuple[list[int], list[int]]:
        return [], []

    def reset(self) -> tuple[list[int], list[int]]:
        return [], []
