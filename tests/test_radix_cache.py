"""The radix prefix cache against hand-computed expectations (page-aligned longest-prefix match, duplicate
accounting on insert, locks, LRU eviction, the hybrid snapshot rule, the unlocked pages a lock would take,
reset) and, for random insert/match sequences, against a brute-force model: a dict from every cached
page-aligned prefix to the page (and snapshot slot) the first insert of that prefix stored."""

import random

import pytest

from tandem.runtime.scheduling.radix_cache import RadixCache


def test_empty_cache_matches_nothing():
    cache = RadixCache(page_size=2)
    pages, length, node = cache.match_prefix([1, 2, 3, 4])
    assert (pages, length, node) == ([], 0, cache.root)
    assert cache.total_cached_pages == 0


def test_longest_page_aligned_prefix():
    cache = RadixCache(page_size=2)
    assert cache.insert([1, 2, 3, 4, 5, 6], [10, 11, 12]).cached_pages == 0
    assert cache.match_prefix([1, 2, 3, 4, 5, 6, 7])[:2] == ([10, 11, 12], 6)
    assert cache.match_prefix([1, 2, 3, 4, 5])[:2] == ([10, 11], 4)  # 5 tokens: two whole pages
    assert cache.match_prefix([1, 2, 3, 4, 9, 9])[:2] == ([10, 11], 4)  # ends inside the node
    assert cache.match_prefix([1, 2, 3, 5])[:2] == ([10], 2)  # the page [3, 5] differs from [3, 4]
    assert cache.match_prefix([1, 2, 3])[:2] == ([10], 2)
    assert cache.match_prefix([1, 9, 3, 4])[:2] == ([], 0)
    assert cache.match_prefix([2, 1])[:2] == ([], 0)
    assert cache.total_cached_pages == 3  # splits on the way did not change what is held


def test_match_returns_the_node_ending_the_match():
    cache = RadixCache(page_size=2)
    cache.insert([1, 2, 3, 4, 5, 6], [10, 11, 12])
    node = cache.match_prefix([1, 2, 3, 4, 8, 8]).node
    assert node.pages == [10, 11] and node.key == (1, 2, 3, 4)
    assert cache.match_prefix([1, 2, 3, 4, 5, 6]).node.pages == [12]  # below the split


def test_insert_reports_the_pages_already_cached():
    cache = RadixCache(page_size=2)
    cache.insert([1, 2, 3, 4, 5, 6], [10, 11, 12])
    result = cache.insert([1, 2, 3, 4, 7, 8], [20, 21, 22])
    assert result.cached_pages == 2  # pages 20, 21 duplicate 10, 11: the caller frees them
    assert result.node.key == (7, 8) and result.node.pages == [22]
    assert cache.match_prefix([1, 2, 3, 4, 7, 8])[:2] == ([10, 11, 22], 6)
    assert cache.total_cached_pages == 4
    assert cache.insert([1, 2, 3, 4, 5, 6], [10, 11, 12]).cached_pages == 3  # the same request again
    assert cache.insert([1, 2], [30]).cached_pages == 1  # a prefix of what is cached
    assert cache.total_cached_pages == 4
    assert cache.insert([], []).cached_pages == 0


def test_insert_rejects_unaligned_input():
    cache = RadixCache(page_size=4)
    with pytest.raises(ValueError, match="not a multiple of page_size 4"):
        cache.insert([1, 2, 3, 4, 5], [0, 1])
    with pytest.raises(ValueError, match="needs 2 pages, got 1"):
        cache.insert([1, 2, 3, 4, 5, 6, 7, 8], [0])
    with pytest.raises(ValueError, match="hybrid"):
        cache.insert([1, 2, 3, 4], [0], state_slot=3)


def test_lock_prevents_eviction():
    cache = RadixCache(page_size=2)
    cache.insert([1, 2, 3, 4], [1, 2])
    cache.insert([5, 6], [3])
    node = cache.match_prefix([1, 2, 3, 4]).node
    cache.lock(node)
    assert cache.protected_pages == 2 and cache.evictable_pages == 1
    assert cache.evict(10) == ([3], [])
    assert cache.total_cached_pages == 2
    assert cache.evict(10) == ([], [])
    cache.unlock(node)
    assert cache.protected_pages == 0
    assert cache.evict(10) == ([1, 2], [])
    assert cache.total_cached_pages == 0
    with pytest.raises(RuntimeError, match="unlock of an unlocked node"):
        cache.unlock(node)


def test_lock_covers_ancestors_and_survives_splits():
    cache = RadixCache(page_size=1)
    cache.insert([1, 2, 3], [7, 8, 9])
    leaf = cache.match_prefix([1, 2, 3]).node
    cache.lock(leaf)
    cache.match_prefix([1, 2, 5])  # splits the locked node after [1, 2]
    cache.insert([1, 6], [4, 5])  # splits again after [1]; adds an unlocked leaf [6]
    assert cache.protected_pages == 3 and cache.total_cached_pages == 4
    assert cache.evict(10) == ([5], [])  # only the new leaf; the locked path stays
    assert cache.match_prefix([1, 2, 3])[:2] == ([7, 8, 9], 3)
    cache.unlock(leaf)
    assert cache.evict(10) == ([9, 8, 7], [])  # leaf first, then the ancestors as they become leaves


def test_eviction_is_least_recently_used_first():
    cache = RadixCache(page_size=2)
    cache.insert([1, 1], [1])
    cache.insert([2, 2], [2])
    cache.insert([3, 3], [3])
    cache.match_prefix([2, 2, 0])
    assert cache.evict(1) == ([1], [])
    cache.match_prefix([3, 3])
    assert cache.evict(1) == ([2], [])
    assert cache.evict(1) == ([3], [])


def test_eviction_frees_at_least_the_request_and_whole_nodes():
    cache = RadixCache(page_size=2)
    cache.insert([1, 2, 3, 4], [1, 2])
    assert cache.insert([1, 2, 5, 6], [9, 3]).cached_pages == 1
    cache.match_prefix([1, 2, 3, 4])  # the [3, 4] branch is now the most recent
    assert cache.evict(1) == ([3], [])  # the older leaf [5, 6]
    assert cache.evict(1) == ([2], [])  # [1, 2] still has a child, so the leaf [3, 4] goes
    cache.insert([7, 8, 9, 10, 11, 12], [4, 5, 6])
    cache.match_prefix([7, 8, 9, 10, 11, 12])
    assert cache.evict(1) == ([1], [])  # [1, 2] was used before [7, 8, ...]
    assert cache.evict(1) == ([4, 5, 6], [])  # a node is freed whole, more than asked


def test_hybrid_match_ends_only_at_state_snapshots():
    cache = RadixCache(page_size=2, hybrid=True)
    result = cache.insert([1, 2, 3, 4, 5, 6], [10, 11, 12], state_slot=0)
    assert result.state_slot_kept and cache.num_state_slots == 1
    match = cache.match_prefix([1, 2, 3, 4, 5, 6, 7, 8])
    assert match[:2] == ([10, 11, 12], 6) and match.node.state_slot == 0
    assert cache.match_prefix([1, 2, 3, 4, 9, 9])[:3] == ([], 0, cache.root)  # no snapshot after [1, 2, 3, 4]
    assert cache.insert([1, 2, 3, 4], [20, 21], state_slot=1).cached_pages == 2
    match = cache.match_prefix([1, 2, 3, 4, 9, 9])
    assert match[:2] == ([10, 11], 4) and match.node.state_slot == 1
    again = cache.insert([1, 2, 3, 4], [10, 11], state_slot=2)
    assert not again.state_slot_kept and again.node.state_slot == 1  # the caller frees slot 2
    cache.insert([1, 2, 3, 4, 5, 6, 7, 8], [10, 11, 12, 13])  # a running request's pages, no snapshot
    match = cache.match_prefix([1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert match[:2] == ([10, 11, 12], 6) and match.node.state_slot == 0
    assert cache.num_state_slots == 2
    pages, slots = cache.evict(100)
    assert sorted(pages) == [10, 11, 12, 13] and sorted(slots) == [0, 1]
    assert cache.num_state_slots == 0


def test_hybrid_state_slot_eviction_drops_unreachable_leaves():
    cache = RadixCache(page_size=2, hybrid=True)
    cache.insert([1, 2], [1], state_slot=5)
    cache.insert([1, 2, 3, 4], [1, 2], state_slot=6)
    cache.match_prefix([1, 2, 9, 9])  # [1, 2] used after [1, 2, 3, 4]
    assert cache.evict_state_slots(1) == ([2], [6])  # the [3, 4] leaf cannot end a match any more
    assert cache.total_cached_pages == 1
    node = cache.match_prefix([1, 2]).node
    cache.lock(node)
    assert cache.evict_state_slots(1) == ([], [])
    cache.unlock(node)
    assert cache.evict_state_slots(1) == ([1], [5])
    assert cache.total_cached_pages == 0 and cache.num_state_slots == 0


def test_hybrid_state_slot_eviction_keeps_pages_needed_below():
    cache = RadixCache(page_size=1, hybrid=True)
    cache.insert([1], [1], state_slot=0)
    cache.insert([1, 2], [1, 2], state_slot=1)
    cache.match_prefix([1, 2])  # [1] and [1, 2] used together: the tie goes to the older node, [1]
    assert cache.evict_state_slots(1) == ([], [0])  # its page stays: the snapshot after [1, 2] needs it
    assert cache.match_prefix([1, 9])[:2] == ([], 0)
    assert cache.match_prefix([1, 2, 3])[:2] == ([1, 2], 2)
    assert cache.evict_state_slots(5) == ([2, 1], [1])
    assert cache.total_cached_pages == 0


def test_unlocked_pages_on_path_are_what_a_lock_takes_off_the_evictable_pages():
    cache = RadixCache(page_size=2)
    cache.insert([1, 2, 3, 4], [10, 11])
    cache.insert([1, 2, 3, 4, 5, 6], [10, 11, 12])  # a leaf [5, 6] under the node [1, 2, 3, 4]
    leaf = cache.match_prefix([1, 2, 3, 4, 5, 6, 7]).node
    assert cache.unlocked_pages_on_path(leaf) == 3 and cache.unlocked_pages_on_path(cache.root) == 0
    cache.lock(leaf.parent)
    assert cache.unlocked_pages_on_path(leaf) == 1 == cache.evictable_pages
    cache.lock(leaf)
    assert cache.unlocked_pages_on_path(leaf) == 0 == cache.evictable_pages


def test_reset_returns_everything_and_refuses_while_locked():
    cache = RadixCache(page_size=1, hybrid=True)
    cache.insert([1, 2], [3, 4], state_slot=7)
    cache.insert([1, 5], [3, 6])
    node = cache.match_prefix([1, 2]).node
    cache.lock(node)
    with pytest.raises(RuntimeError, match="locked"):
        cache.reset()
    cache.unlock(node)
    pages, slots = cache.reset()
    assert sorted(pages) == [3, 4, 6] and slots == [7]
    assert cache.total_cached_pages == 0
    assert cache.match_prefix([1, 2])[:2] == ([], 0)


@pytest.mark.parametrize("hybrid", [False, True])
@pytest.mark.parametrize("page_size", [1, 3])
def test_random_inserts_and_matches_against_brute_force(hybrid, page_size):
    rng = random.Random(page_size * 2 + hybrid)
    cache = RadixCache(page_size, hybrid=hybrid)
    page_of: dict[tuple, int] = {}  # page-aligned prefix -> the page the first insert of it stored
    slot_of: dict[tuple, int] = {}  # prefix -> the first snapshot slot inserted there
    next_page, next_slot = 0, 0
    for _ in range(300):
        tokens = [rng.randint(0, 2) for _ in range(rng.randint(0, 8) * page_size + rng.randint(0, page_size - 1))]
        aligned = len(tokens) // page_size
        prefixes = [tuple(tokens[:(j + 1) * page_size]) for j in range(aligned)]
        cached_len = 0
        while cached_len < aligned and prefixes[cached_len] in page_of:
            cached_len += 1
        hit = cached_len
        if hybrid:
            hit = max([j + 1 for j in range(cached_len) if prefixes[j] in slot_of], default=0)
        pages, length, node = cache.match_prefix(tokens)
        assert length == hit * page_size
        assert pages == [page_of[prefixes[j]] for j in range(hit)]
        if hybrid and hit:
            assert node.state_slot == slot_of[prefixes[hit - 1]]
        if rng.random() < 0.6:
            new_pages = list(range(next_page, next_page + aligned))
            next_page += aligned
            slot = None
            if hybrid and aligned and rng.random() < 0.7:
                slot, next_slot = next_slot, next_slot + 1
            result = cache.insert(tokens[:aligned * page_size], new_pages, state_slot=slot)
            assert result.cached_pages == cached_len
            for j, prefix in enumerate(prefixes):
                page_of.setdefault(prefix, new_pages[j])
            if slot is not None:
                assert result.state_slot_kept == (prefixes[-1] not in slot_of)
                slot_of.setdefault(prefixes[-1], slot)
        assert cache.total_cached_pages == len(page_of)
        assert cache.num_state_slots == len(slot_of)


def test_cached_len_ignores_snapshots_and_changes_nothing():
    cache = RadixCache(page_size=2, hybrid=True)
    cache.insert([1, 2, 3, 4, 5, 6], [10, 11, 12], state_slot=7)
    nodes_before = len(list(cache._nodes()))
    assert cache.cached_len([1, 2, 3, 4, 9, 9]) == 4  # the KV is cached up to where the tokens part
    assert cache.match_prefix([1, 2, 3, 4, 9, 9]).matched_len == 0  # no snapshot there
    assert cache.cached_len([1, 2, 3, 4, 5, 6, 7]) == 6 and cache.cached_len([2]) == 0
    assert len(list(cache._nodes())) == nodes_before  # no split
