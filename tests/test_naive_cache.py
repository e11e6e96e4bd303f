"""The do-nothing prefix cache of `--disable-radix-cache` (`NaiveCache`): through the scheduler with a fake
executor (which checks that every span's pages and state hold the request's own tokens), a workload of shared
prefixes, repeats and preemption gives the same tokens with it as with the radix cache, never reuses a page
or a state, and frees every page and slot at the end; through the engine, a dense and a hybrid model give
the same tokens and logprobs with the radix cache on (hits reported) and off (none)."""

import pytest
import torch
from test_scheduler import expected_continuation, make, request, run

from tandem.engine import Engine
from tandem.runtime.scheduling.naive_cache import NaiveCache
from tandem.runtime.scheduling.radix_cache import RadixCache


def test_naive_cache_answers_as_an_empty_radix_cache():
    naive, empty = NaiveCache(4), RadixCache(4)
    ids = list(range(1, 14))
    assert naive.match_prefix(ids)[:2] == empty.match_prefix(ids)[:2] == ([], 0)
    assert naive.cached_len(ids) == empty.cached_len(ids) == 0
    kept = naive.insert(ids[:8], [3, 4])
    assert (kept.cached_pages, kept.state_slot_kept, kept.held_pages) == (0, False, 0)
    assert naive.match_prefix(ids)[:2] == ([], 0) and naive.total_cached_pages == naive.evictable_pages == 0
    assert naive.evict(5) == ([], []) and naive.evict_state_slots(1) == ([], [])


def workload(hybrid: bool, radix: bool):
    """Shared prefixes arriving together and one after another, a repeat of a finished prompt, and a pool
    small enough that decoding retracts requests."""
    sched, ex = make(tokens=96, page_size=4, max_running=4, chunk=16, hybrid=hybrid, radix=radix)
    shared = list(range(1, 41))
    reqs = [request(shared + [60 + i], max_new_tokens=10 + i) for i in range(3)]
    reqs += [request(list(range(70, 80)), max_new_tokens=30)]
    for r in reqs:
        sched.add(r)
    run(sched, ex)
    again = request(shared + [60], max_new_tokens=10)
    sched.add(again)
    run(sched, ex)
    return sched, ex, reqs + [again]


@pytest.mark.parametrize("hybrid", [False, True], ids=["dense", "hybrid"])
def test_same_tokens_as_the_radix_cache_and_nothing_reused(hybrid):
    with_radix, without = workload(hybrid, radix=True), workload(hybrid, radix=False)
    for _, _, reqs in (with_radix, without):
        for r in reqs:
            assert r.output_ids == expected_continuation(r.prompt_ids, r.params.max_new_tokens)
    assert [r.output_ids for r in with_radix[2]] == [r.output_ids for r in without[2]]
    assert with_radix[2][-1].cached_tokens > 0  # the radix cache served the repeat
    sched, ex, reqs = without
    assert all(r.cached_tokens == 0 for r in reqs)
    assert sched.stats()["preemptions"] > 0, "the pool is small enough to retract requests"
    for st in ex.steps:  # every (re)admitted request starts from position 0 with a zeroed state
        assert all(s.prefix_len == 0 for s, fresh in zip(st.spans, st.fresh_table) if fresh)
        assert st.state_restores == [] and st.state_snapshots == []
    cache = sched.cache
    assert cache.pages.num_free == cache.num_pages and cache.request_slots.num_free == cache.max_running_requests
    assert sched.stats()["cached_pages"] == 0 and sched.stats()["prefix_cache_queries"] == 0


SHARED, PAGE = 48, 16
SAMPLING = {"temperature": 0, "max_new_tokens": 5, "ignore_eos": True}


def _turns() -> list[list[int]]:
    gen = torch.Generator().manual_seed(17)
    shared = torch.randint(3, 300, (SHARED,), generator=gen).tolist()
    return [shared + torch.randint(3, 300, (4 + i,), generator=gen).tolist() for i in range(2)]


@pytest.mark.parametrize("kind", ["llama", "qwen3_5"])
def test_engine_tokens_equal_with_and_without_the_radix_cache(ckpt, kind):
    results = {}
    for disable in (False, True):
        with Engine(ckpt(kind), dtype="float32", progress=False, disable_radix_cache=disable) as engine:
            # one after the other, so that the second finds the first's prefix (and snapshot) cached
            results[disable] = [engine.generate(input_ids=p, sampling_params=SAMPLING, return_logprob=True)[0]
                                for p in _turns()]
    assert [o["meta_info"]["cached_tokens"] for o in results[True]] == [0, 0]
    assert results[False][1]["meta_info"]["cached_tokens"] == SHARED // PAGE * PAGE
    for got, expected in zip(results[False], results[True]):
        assert got["output_ids"] == expected["output_ids"]
        lps = zip(got["meta_info"]["output_token_logprobs"], expected["meta_info"]["output_token_logprobs"])
        assert max(abs(a - b) for (a, _), (b, _) in lps) < 1e-4
