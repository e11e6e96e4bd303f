"""The continuous-batching scheduler against a fake executor (no model): admission by tokens, chunked prefill
next to running decodes, stop strings / stop_token_ids / EOS / ignore_eos, context limit, abort, prompt
logprobs across prefill chunks, preemption, and the radix prefix cache's decisions (page sharing, eviction,
hybrid state snapshots), all checked against what a paged cache must hold."""

import pytest

from tandem.errors import ConfigError
from tandem.runtime.sampling.params import SamplingParams
from tandem.runtime.scheduling.cache_manager import CacheManager
from tandem.runtime.scheduling.scheduler import Request, Scheduler
from tandem.runtime.step import StepInput, StepOutput

VOCAB = 100


def next_token(ids: list[int]) -> int:
    """The fake model: the next token is the last one plus one."""
    return (ids[-1] + 1) % VOCAB


class FakeExecutor:
    """Applies each step's cache decisions as a rank does (page tables, state restores, resets, snapshots) to a
    paged "KV cache" that stores (position, token) per token slot and a "state" per slot that is the tuple of
    tokens it has consumed. Every span is checked against the truth (the tokens of the planned request the
    step names by that key, passed with the step): its prefix must be in its pages and, for the state, in its
    slot. Then it samples `next_token(tokens)`. Prompt
    logprobs are the target token ids (as floats), so a test can see which prompt token each belongs to."""

    def __init__(self, page_size: int, hybrid: bool = False):
        self.page_size, self.hybrid = page_size, hybrid
        self.kv: dict[int, tuple[int, int]] = {}
        self.tables: dict = {}
        self.state: dict[int, tuple] = {}
        self.steps: list[StepInput] = []
        self.released: list = []

    def execute(self, step: StepInput, reqs: list[Request]) -> StepOutput:
        self.steps.append(step)
        assert list(step.keys) == [req.rid for req in reqs], "a span per planned request, in order"
        truth = {req.rid: req.all_ids for req in reqs}
        ps = self.page_size
        for key in step.release_keys:
            self.released.append(key)
            self.tables.pop(key, None)
        for key, pages, fresh in zip(step.keys, step.new_pages, step.fresh_table):
            self.tables[key] = list(pages) if fresh else self.tables[key] + list(pages)
        for span, params, fresh in zip(step.spans, step.params, step.fresh_table):
            # as a rank keeps them: params come with the step that (re)admits a request, and only then
            assert (params is not None) == (span.prefix_len == 0 or fresh), "params only on (re)admission"
        assert len({s.state_slot for s in step.spans}) == len(step.spans), "one span per state slot"
        restored = {dst: self.state.get(src) for src, dst in step.state_restores}
        self.state.update(restored)
        for slot in step.state_resets:
            self.state[slot] = ()
        tokens, logprobs, input_lps = [], [], []
        offset = 0
        for i, (span, key) in enumerate(zip(step.spans, step.keys)):
            ids = step.input_ids[offset:offset + span.num_tokens]
            offset += span.num_tokens
            assert span.num_tokens >= 1
            table = self.tables[key]
            assert len(table) * ps >= span.prefix_len + span.num_tokens, "pages for every token of the span"
            slot_of = lambda pos, table=table: table[pos // ps] * ps + pos % ps
            cached = [self.kv.get(slot_of(pos), (None, None)) for pos in range(span.prefix_len)]
            assert [p for p, _ in cached] == list(range(span.prefix_len)), "the prefix must be in the request's pages"
            seq = [t for _, t in cached] + ids
            assert seq == truth[key][:len(seq)], "the pages must hold the request's own tokens"
            if self.hybrid:  # a model without linear-attention layers has no state to carry
                assert self.state.get(span.state_slot) == tuple(seq[:span.prefix_len]), "state = the cached prefix"
            self.state[span.state_slot] = tuple(seq)
            for pos in range(span.prefix_len, span.prefix_len + span.num_tokens):
                self.kv[slot_of(pos)] = (pos, seq[pos])
            if step.sample[i]:
                tokens.append(next_token(seq))
                logprobs.append(-0.5)
            else:
                tokens.append(None)
                logprobs.append(None)
            if step.input_logprobs and step.input_logprobs[i]:
                targets = ids[1:] + ([step.next_ids[i]] if step.next_ids[i] is not None else [])
                input_lps.append([float(t) for t in targets])
            else:
                input_lps.append(None)
        for src, dst in step.state_snapshots:
            self.state[dst] = self.state[src]
        assert offset == len(step.input_ids)
        return StepOutput(tokens, logprobs, input_lps if step.input_logprobs else None)


def make(max_running=4, max_len=256, chunk=512, eos=(), decode_text=None, tokens=4096, page_size=4, hybrid=False,
         radix=True):
    cache = CacheManager(tokens, page_size, max_running, hybrid=hybrid, radix_cache=radix)
    sched = Scheduler(cache, max_len, chunk, eos, decode_text)
    return sched, FakeExecutor(page_size, hybrid=hybrid)


def request(prompt, **params) -> Request:
    params.setdefault("max_new_tokens", 4)
    return Request(list(prompt), SamplingParams.from_dict(params))


def step(sched: Scheduler, ex: FakeExecutor):
    planned = sched.next_step()
    if planned is None:
        return None
    st, reqs = planned
    sched.process(st, reqs, ex.execute(st, reqs))
    return st, reqs


def run(sched, ex, max_steps=1000):
    for _ in range(max_steps):
        if not sched.has_work or step(sched, ex) is None:
            return
    raise AssertionError("scheduler did not finish")


def expected_continuation(prompt, n):
    out, ids = [], list(prompt)
    for _ in range(n):
        ids.append(next_token(ids))
        out.append(ids[-1])
    return out


def slots_of(st: StepInput) -> list[int]:
    return [s.state_slot for s in st.spans]


# ---- admission ------------------------------------------------------------------------------------------------

def test_admission_is_limited_by_max_running_requests():
    sched, ex = make(max_running=2)
    reqs = [request([10 * i + 1, 10 * i + 2], max_new_tokens=3 + i) for i in range(4)]
    for r in reqs:
        sched.add(r)
    st, planned = step(sched, ex)
    assert planned == reqs[:2]
    assert sorted(slots_of(st)) == [0, 1]
    assert list(sched.waiting) == reqs[2:]
    run(sched, ex)
    for r in reqs:
        assert r.output_ids == expected_continuation(r.prompt_ids, r.params.max_new_tokens)
        assert r.finish_reason == {"type": "length", "length": r.params.max_new_tokens}
    # at no step did more than two requests run, and every request had a slot in [0, 2)
    assert max(len(s.spans) for s in ex.steps) == 2
    assert all(set(slots_of(s)) <= {0, 1} for s in ex.steps)
    # the third request started only after the first finished, in its freed slot, with a reset
    third_first_step = next(i for i, s in enumerate(ex.steps) if reqs[2].rid in s.keys)
    assert len(reqs[0].output_ids) == 3 and third_first_step == 3
    assert ex.steps[3].state_resets == [ex.steps[3].spans[ex.steps[3].keys.index(reqs[2].rid)].state_slot]
    assert sched.cache.request_slots.num_free == 2
    assert set(ex.released) <= {r.rid for r in reqs}


def test_admission_is_limited_by_free_pages():
    # 8 pages of 4 tokens; prompts of 8 tokens (2 pages) + a reserve of half of 8 new tokens (1 page)
    sched, ex = make(tokens=32, page_size=4, radix=False)
    reqs = [request(list(range(10 * i, 10 * i + 8)), max_new_tokens=8) for i in range(4)]
    for r in reqs:
        sched.add(r)
    st, planned = step(sched, ex)
    # the first takes 2 pages and reserves 1; the second fits (2 + 1 of the 5 left); the third does not
    assert planned == reqs[:2] and list(sched.waiting) == reqs[2:]
    run(sched, ex)
    for r in reqs:
        assert r.output_ids == expected_continuation(r.prompt_ids, 8)
    assert sched.cache.pages.num_free == 8


def test_a_request_alone_may_use_the_whole_pool():
    sched, ex = make(tokens=16, page_size=4, radix=False)
    r = request(list(range(1, 11)), max_new_tokens=100)  # 10 + 100 would never fit: it runs to the pool's end
    sched.add(r)
    run(sched, ex)
    assert len(r.all_ids) == 16 and r.finish_reason == {"type": "length", "length": 6}


def test_finished_requests_are_released_to_the_executor():
    sched, ex = make()
    r = request([1, 2], max_new_tokens=2)
    sched.add(r)
    run(sched, ex)
    sched.add(request([5], max_new_tokens=1))
    step(sched, ex)
    assert r.rid in ex.released


def test_max_new_tokens_zero_finishes_at_once():
    sched, ex = make()
    r = request([1, 2, 3], max_new_tokens=0)
    sched.add(r)
    assert r.finished and r.output_ids == [] and not sched.has_work


def test_invalid_prompts():
    sched, _ = make(max_len=8)
    with pytest.raises(ConfigError, match="empty"):
        sched.add(request([]))
    with pytest.raises(ConfigError, match="context length"):
        sched.add(request(list(range(8))))
    assert not sched.has_work


def test_a_prompt_larger_than_the_pool_is_refused_naming_both_numbers():
    sched, _ = make(max_len=1000, tokens=64)
    with pytest.raises(ConfigError, match="the prompt has 64 tokens, but the KV cache holds 64 tokens"):
        sched.add(request(list(range(64))))
    sched.add(request(list(range(63))))  # 63 + one new token fit


def test_context_limit_finishes_with_length():
    sched, ex = make(max_len=10)
    r = request(list(range(1, 7)), max_new_tokens=100)
    sched.add(r)
    run(sched, ex)
    assert len(r.all_ids) == 10 and r.finish_reason["type"] == "length"


# ---- chunked prefill ----------------------------------------------------------------------------------------

def test_chunked_prefill_splits_long_prompt_while_decodes_continue():
    sched, ex = make(chunk=16)
    short = request([1, 2, 3], max_new_tokens=20)
    sched.add(short)
    step(sched, ex)  # prefill of the short request; it is decoding from now on
    long = request(list(range(20, 60)), max_new_tokens=3)  # 40 tokens
    sched.add(long)
    long_spans, short_tokens_before = [], len(short.output_ids)
    steps_with_long_prefill = 0
    while long.num_cached < len(long.prompt_ids):
        st, reqs = step(sched, ex)
        assert sum(s.num_tokens for s in st.spans) <= 16, "the step exceeds the token budget"
        assert short in reqs, "the decode must not wait for the long prefill"
        long_spans += [s for s, r in zip(st.spans, reqs) if r is long]
        steps_with_long_prefill += 1
    assert steps_with_long_prefill >= 3
    assert len(short.output_ids) == short_tokens_before + steps_with_long_prefill
    # the chunks tile the prompt in order
    assert [s.prefix_len for s in long_spans] == [sum(x.num_tokens for x in long_spans[:i])
                                                  for i in range(len(long_spans))]
    assert sum(s.num_tokens for s in long_spans) == 40
    assert all(s.num_tokens <= 16 for s in long_spans)
    assert len(long.output_ids) == 1, "a token is sampled only after the last chunk"
    run(sched, ex)
    assert long.output_ids == expected_continuation(long.prompt_ids, 3)
    assert short.output_ids == expected_continuation(short.prompt_ids, 20)


def test_sample_flag_only_on_last_chunk():
    sched, ex = make(chunk=8)
    r = request(list(range(1, 21)), max_new_tokens=2)
    sched.add(r)
    run(sched, ex)
    flags = [st.sample[0] for st in ex.steps]
    sizes = [st.spans[0].num_tokens for st in ex.steps]
    assert sizes == [8, 8, 4, 1] and flags == [False, False, True, True]
    assert ex.steps[0].state_resets == slots_of(ex.steps[0]) and all(not st.state_resets for st in ex.steps[1:])


def test_prompt_logprobs_cover_every_prompt_token_across_chunks():
    sched, ex = make(chunk=7)
    prompt = list(range(30, 53))  # 23 tokens: chunks of 7, 7, 7, 2
    r = request(prompt, max_new_tokens=2)
    r.input_logprobs_wanted = True
    other = request([3, 4, 5], max_new_tokens=2)  # no prompt logprobs wanted
    sched.add(r)
    sched.add(other)
    run(sched, ex)
    # the fake reports each target token id as its "logprob": one per prompt token after the first
    assert r.input_logprobs == [float(t) for t in prompt[1:]]
    assert other.input_logprobs == []


# ---- stopping --------------------------------------------------------------------------------------------------

def letters(ids: list[int]) -> str:
    return "".join(chr(ord("a") + t % 26) for t in ids)


def test_stop_string():
    sched, ex = make(decode_text=letters)
    r = request([0], max_new_tokens=20, stop=["xyz", "def"])  # outputs 1, 2, 3, ... = "bcdef..."
    sched.add(r)
    run(sched, ex)
    assert letters(r.output_ids) == "bcdef"
    assert r.finish_reason == {"type": "stop", "matched": "def"}


def test_stop_string_not_reached():
    sched, ex = make(decode_text=letters)
    r = request([0], max_new_tokens=5, stop="zz")
    sched.add(r)
    run(sched, ex)
    assert r.finish_reason == {"type": "length", "length": 5}


def test_stop_token_ids():
    sched, ex = make()
    r = request([10], max_new_tokens=20, stop_token_ids=[14, 40])
    sched.add(r)
    run(sched, ex)
    assert r.output_ids == [11, 12, 13, 14]
    assert r.finish_reason == {"type": "stop", "matched": 14}


@pytest.mark.parametrize("ignore_eos", [False, True])
def test_eos_and_ignore_eos(ignore_eos):
    sched, ex = make(eos=[13])
    r = request([10], max_new_tokens=6, ignore_eos=ignore_eos)
    sched.add(r)
    run(sched, ex)
    if ignore_eos:
        assert r.output_ids == [11, 12, 13, 14, 15, 16]
        assert r.finish_reason == {"type": "length", "length": 6}
    else:
        assert r.output_ids == [11, 12, 13]
        assert r.finish_reason == {"type": "stop", "matched": 13}


def test_ignore_eos_keeps_stop_token_ids():
    sched, ex = make(eos=[13])
    r = request([10], max_new_tokens=10, ignore_eos=True, stop_token_ids=[15])
    sched.add(r)
    run(sched, ex)
    assert r.output_ids == [11, 12, 13, 14, 15]


# ---- abort -----------------------------------------------------------------------------------------------------

def test_abort_running_request_frees_its_slot():
    sched, ex = make(max_running=1)
    a = request([1, 2], max_new_tokens=50)
    b = request([7, 8], max_new_tokens=2)
    sched.add(a)
    sched.add(b)
    step(sched, ex)
    step(sched, ex)
    assert sched.running == [a] and list(sched.waiting) == [b]
    a_slot = ex.steps[-1].spans[0].state_slot
    assert sched.abort(a.rid) is True
    assert a.finish_reason == {"type": "abort"} and a.cache is None
    st, reqs = step(sched, ex)
    assert reqs == [b] and slots_of(st) == [a_slot] and st.state_resets == [a_slot]
    assert a.rid in st.release_keys
    run(sched, ex)
    assert b.output_ids == expected_continuation([7, 8], 2)
    assert len(a.output_ids) == 2


def test_abort_waiting_request_and_unknown_id():
    sched, ex = make(max_running=1)
    a, b = request([1], max_new_tokens=3), request([2], max_new_tokens=3)
    sched.add(a)
    sched.add(b)
    assert sched.abort(b.rid) is True
    assert b.finish_reason == {"type": "abort"} and b.cache is None
    assert sched.abort("no-such-request") is False
    run(sched, ex)
    assert a.output_ids == expected_continuation([1], 3) and b.output_ids == []
    assert all(len(st.spans) == 1 for st in ex.steps)


def test_abort_while_step_in_flight_drops_its_result():
    sched, ex = make()
    a = request([1, 2], max_new_tokens=5)
    sched.add(a)
    st, reqs = sched.next_step()
    out = ex.execute(st, reqs)
    sched.abort(a.rid)
    assert sched.process(st, reqs, out) == []
    assert a.output_ids == [] and a.finish_reason == {"type": "abort"}
    assert not sched.has_work and sched.cache.request_slots.num_free == 4


# ---- preemption ------------------------------------------------------------------------------------------------

def test_params_travel_only_with_the_step_that_admits_a_request():
    sched, ex = make(chunk=8)
    r = request(list(range(1, 21)), max_new_tokens=3, temperature=0.5, seed=7)
    sched.add(r)
    run(sched, ex)
    assert [st.params[0] for st in ex.steps] == [r.params, None, None, None, None]


def test_decode_out_of_pages_retracts_the_newest_and_resumes_them():
    # 12 pages of 4 tokens for 6 requests that each reach 4 + 12 = 16 tokens (4 pages): 24 pages in all
    sched, ex = make(tokens=48, page_size=4, max_running=8, radix=False)
    reqs = [request(list(range(10 * i + 1, 10 * i + 5)), max_new_tokens=12) for i in range(6)]
    for r in reqs:
        sched.add(r)
    retracted_order = []
    for _ in range(1000):
        if not sched.has_work:
            break
        before = list(sched.running)
        planned = step(sched, ex)
        assert planned is not None
        gone = [r for r in before if r not in sched.running and not r.finished]
        if gone:
            assert gone == before[len(before) - len(gone):], "the most recently admitted go first"
            assert list(sched.waiting)[:len(gone)] == sorted(gone, key=before.index), "to the queue's front"
            retracted_order.extend(gone)
    assert sched.stats()["preemptions"] == len(retracted_order) > 0
    resumed = {r.rid for r in retracted_order}  # each got its params again with the step that resumed it
    assert all(any(p is not None and f for st in ex.steps for p, f, k in zip(st.params, st.fresh_table, st.keys)
                   if k == rid) for rid in resumed)
    for r in reqs:  # FakeExecutor checked that every resumed request's pages hold its own tokens
        assert r.output_ids == expected_continuation(r.prompt_ids, 12)
    assert sched.cache.pages.num_free == 12 and sched.cache.request_slots.num_free == 8


def test_resumed_request_reports_each_prompt_logprob_once():
    sched, ex = make(tokens=24, page_size=4, max_running=4, radix=False)
    reqs = [request(list(range(20 * i + 1, 20 * i + 8)), max_new_tokens=10) for i in range(3)]
    for r in reqs:
        r.input_logprobs_wanted = True
        sched.add(r)
    run(sched, ex)
    assert sched.stats()["preemptions"] > 0
    for r in reqs:
        assert r.input_logprobs == [float(t) for t in r.prompt_ids[1:]]
        assert r.output_ids == expected_continuation(r.prompt_ids, 10)


# ---- the radix prefix cache ----------------------------------------------------------------------------------

def test_a_cached_prefix_is_reused_page_aligned():
    sched, ex = make(page_size=4)
    shared = list(range(1, 12))  # 11 tokens: 2 whole pages
    first = request(shared + [50, 51], max_new_tokens=3)
    sched.add(first)
    run(sched, ex)
    first_pages = ex.steps[0].new_pages[0]
    second = request(shared + [60], max_new_tokens=3)
    sched.add(second)
    st, _ = step(sched, ex)
    assert second.cached_tokens == 8 and st.spans[0].prefix_len == 8 and st.spans[0].num_tokens == 4
    assert st.fresh_table == [True] and st.new_pages[0][:2] == first_pages[:2]
    run(sched, ex)  # FakeExecutor checked that the shared pages hold the shared tokens
    assert second.output_ids == expected_continuation(second.prompt_ids, 3)
    assert (sched.stats()["prefix_cache_queries"], sched.stats()["prefix_cache_hit_tokens"]) == (2, 8)


def test_no_reuse_with_the_radix_cache_disabled():
    sched, ex = make(page_size=4, radix=False)
    shared = list(range(1, 12))
    for suffix in ([50], [60]):
        r = request(shared + suffix, max_new_tokens=2)
        sched.add(r)
        run(sched, ex)
        assert r.cached_tokens == 0
    assert all(s.prefix_len == 0 for st in ex.steps for s in st.spans if st.fresh_table[0])


def test_requests_sharing_a_prefix_wait_for_the_first_to_cache_it():
    sched, ex = make(page_size=4, chunk=16)
    shared = list(range(1, 41))  # 40 tokens: 10 pages
    reqs = [request(shared + [60 + i, 61 + i], max_new_tokens=2) for i in range(3)]
    for r in reqs:
        sched.add(r)
    run(sched, ex)
    assert reqs[0].cached_tokens == 0 and [r.cached_tokens for r in reqs[1:]] == [40, 40]
    computed = sum(s.num_tokens for st in ex.steps for s in st.spans)
    assert computed == 42 + 2 * 2 + 3 * 1  # the shared prefix once, each suffix, one decode each


def test_unlocked_cached_prefixes_are_evicted_least_recently_used_first():
    sched, ex = make(tokens=16, page_size=4, max_running=1)
    a, b = request([1, 2, 3, 4, 5], max_new_tokens=1), request([6, 7, 8, 9, 10], max_new_tokens=1)
    for r in (a, b):
        sched.add(r)
        run(sched, ex)
    assert sched.cache.prefix_cache.total_cached_pages == 2
    big = request(list(range(20, 32)), max_new_tokens=1)  # 12 tokens: 3 pages of the 2 free + evictions
    sched.add(big)
    run(sched, ex)
    assert sched.cache.prefix_cache.match_prefix([1, 2, 3, 4, 5]).matched_len == 0  # a, the older, went
    assert sched.cache.prefix_cache.match_prefix([6, 7, 8, 9, 10]).matched_len == 4
    assert big.output_ids == [32]


def test_hybrid_hits_resume_from_a_state_snapshot():
    sched, ex = make(page_size=4, hybrid=True)
    shared = list(range(1, 14))  # 13 tokens
    first = request(shared + [70], max_new_tokens=2)  # snapshot where a same-prompt request resumes: 12
    sched.add(first)
    run(sched, ex)
    snapshots = [op for st in ex.steps for op in st.state_snapshots]
    assert len(snapshots) == 1 and snapshots[0][1] >= sched.cache.max_running_requests
    second = request(shared + [80, 81], max_new_tokens=2)
    sched.add(second)
    st, _ = step(sched, ex)
    assert second.cached_tokens == 12 and st.state_restores == [(snapshots[0][1], st.spans[0].state_slot)]
    assert st.state_resets == []
    run(sched, ex)  # FakeExecutor checked the restored state equals the 12 cached tokens
    assert second.output_ids == expected_continuation(second.prompt_ids, 2)


def test_hybrid_in_batch_sharing_snapshots_where_the_prompts_part():
    sched, ex = make(page_size=4, hybrid=True, chunk=64)
    shared = list(range(1, 42))  # 41 tokens: the prompts part after 40 (10 pages)
    reqs = [request(shared + [60 + i] * 9, max_new_tokens=2) for i in range(3)]
    for r in reqs:
        sched.add(r)
    run(sched, ex)
    assert [r.cached_tokens for r in reqs] == [0, 40, 40]
    first_chunks = [s.num_tokens for st in ex.steps for s, k in zip(st.spans, st.keys) if k == reqs[0].rid]
    assert first_chunks[0] == 40  # the chunk ended where the others can resume, and was snapshot there
    for r in reqs:
        assert r.output_ids == expected_continuation(r.prompt_ids, 2)


def test_hybrid_snapshots_where_a_request_leaves_the_cached_prefix():
    """One after another, prompts sharing 40 tokens and then differing for 20: the first snapshots only at its
    own prompt's end, which the second cannot use; the second snapshots where it leaves the first's cached KV,
    so the third resumes there."""
    sched, ex = make(page_size=4, hybrid=True)
    shared = list(range(1, 41))
    reqs = [request(shared + [50 + i] * 20, max_new_tokens=2) for i in range(3)]
    for r in reqs:
        sched.add(r)
        run(sched, ex)
    assert [r.cached_tokens for r in reqs] == [0, 0, 40]
    for r in reqs:
        assert r.output_ids == expected_continuation(r.prompt_ids, 2)


# ---- through the engine -------------------------------------------------------------------------------------

def test_engine_stop_token_ids_and_eos(ckpt):
    from tandem.engine import Engine

    prompt = [5, 17, 42, 99, 123, 7]
    with Engine(ckpt("llama"), dtype="float32", progress=False, max_running_requests=2) as engine:
        free = engine.generate(input_ids=prompt, sampling_params=dict(temperature=0, max_new_tokens=10,
                                                                       ignore_eos=True))[0]
        ids = free["output_ids"]
        assert free["meta_info"]["finish_reason"]["type"] == "length" and len(ids) == 10
        stop = ids[4]
        cut = ids.index(stop) + 1
        stopped = engine.generate(input_ids=prompt, sampling_params=dict(temperature=0, max_new_tokens=10,
                                                                          ignore_eos=True, stop_token_ids=[stop]))[0]
        assert stopped["output_ids"] == ids[:cut]
        assert stopped["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
        assert stopped["meta_info"]["completion_tokens"] == cut
        # more prompts than slots: all complete, identical to running alone
        many = engine.generate(input_ids=[prompt] * 5, sampling_params=dict(temperature=0, max_new_tokens=10,
                                                                             ignore_eos=True))
        assert all(o["output_ids"] == ids for o in many)
