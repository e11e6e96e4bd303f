"""Hybrid prefix hits through the previous answer, against the fake executor of test_scheduler (which checks
that every span's restored state equals its cached prefix and its pages hold its own tokens): long prefills
snapshot their state at multiples of the tracking interval, so the first repeat of a 300-token system prompt
resumes at 256; a finished request leaves its prompt and answer cached through its last page, with the state
there, so a chat's second turn resumes after the first turn's answer; the snapshot budget is bounded and
least recently used snapshots go first; and the tokens equal a run without any prefix cache."""

from test_scheduler import expected_continuation, make, request, run

from tandem.runtime.scheduling.cache_manager import TRACK_INTERVAL

PAGE = 4


def test_the_first_repeat_of_a_system_prompt_resumes_at_the_tracking_interval():
    sched, ex = make(page_size=PAGE, hybrid=True, chunk=512, max_len=1024, tokens=4096)
    system = list(range(1, 301))  # 300 tokens, then 60 of each request's own
    first, second = request(system + [7] * 60, max_new_tokens=3), request(system + [5] * 60, max_new_tokens=3)
    for r in (first, second):
        sched.add(r)
        run(sched, ex)
    assert first.cached_tokens == 0 and second.cached_tokens == TRACK_INTERVAL == 256
    chunks = [s.num_tokens for st in ex.steps for s, k in zip(st.spans, st.keys) if k == first.rid]
    assert chunks[0] == 256  # the chunk was cut at the interval, and the state snapshot there
    for r in (first, second):
        assert r.output_ids == expected_continuation(r.prompt_ids, 3)


def test_the_second_turn_resumes_after_the_first_turns_answer():
    sched, ex = make(page_size=PAGE, hybrid=True)
    turn1 = request(list(range(1, 23)), max_new_tokens=13)  # 22 + 13 tokens; 34 computed when it ends
    sched.add(turn1)
    run(sched, ex)
    turn2 = request(turn1.all_ids + [90, 91, 92], max_new_tokens=4)
    sched.add(turn2)
    run(sched, ex)
    assert turn2.cached_tokens == (len(turn1.all_ids) - 1) // PAGE * PAGE == 32  # through the answer's last page
    turn3 = request(turn2.all_ids + [93], max_new_tokens=2)
    sched.add(turn3)
    run(sched, ex)
    assert turn3.cached_tokens == (len(turn2.all_ids) - 1) // PAGE * PAGE
    for r in (turn1, turn2, turn3):
        assert r.output_ids == expected_continuation(r.prompt_ids, r.params.max_new_tokens)
    # a decoding request's state is copied into one tracking slot of its own, the same at each page boundary
    tracked = {dst for st in ex.steps for src, dst in st.state_snapshots if len(st.spans) == 1
               and st.spans[0].num_tokens == 1 and st.keys[0] == turn1.rid}
    assert len(tracked) == 1


def test_retracted_hybrid_requests_leave_their_tracked_state_and_lose_no_slot():
    sched, ex = make(page_size=PAGE, hybrid=True, tokens=48, max_running=8)
    reqs = [request(list(range(10 * i + 1, 10 * i + 5)), max_new_tokens=12) for i in range(6)]
    for r in reqs:
        sched.add(r)
    run(sched, ex)
    assert sched.stats()["preemptions"] > 0
    for r in reqs:
        assert r.output_ids == expected_continuation(r.prompt_ids, 12)
    cache = sched.cache  # every page and snapshot slot is free or the prefix cache's: none was lost
    assert cache.pages.num_free + cache.prefix_cache.total_cached_pages == cache.num_pages
    assert cache.snapshot_slots.num_free + cache.prefix_cache.num_state_slots == cache.snapshot_slots.count


def test_the_snapshot_budget_is_bounded_and_the_least_recently_used_go_first():
    sched, ex = make(page_size=PAGE, hybrid=True, max_running=2)  # 2 snapshot slots
    conversations = [request([100 + i] * 21, max_new_tokens=6) for i in range(4)]
    for r in conversations:
        sched.add(r)
        run(sched, ex)
    assert sched.cache.snapshot_slots.count == 2 and sched.cache.prefix_cache.num_state_slots <= 2
    latest, oldest = request(conversations[-1].all_ids + [1], max_new_tokens=1), request(
        conversations[0].all_ids + [1], max_new_tokens=1)
    for r in (latest, oldest):
        sched.add(r)
        run(sched, ex)
    assert latest.cached_tokens == (len(conversations[-1].all_ids) - 1) // PAGE * PAGE
    assert oldest.cached_tokens == 0  # its snapshots were evicted for the later conversations'
    for r in conversations + [latest, oldest]:
        assert r.output_ids == expected_continuation(r.prompt_ids, r.params.max_new_tokens)


def test_tokens_equal_a_run_without_a_prefix_cache():
    outputs = {}
    for radix in (True, False):
        sched, ex = make(page_size=PAGE, hybrid=True, chunk=64, radix=radix, max_len=1024)
        system = list(range(1, 300))
        turn1 = [request(system + [i], max_new_tokens=9) for i in range(3)]
        for r in turn1:
            sched.add(r)
        run(sched, ex)
        turn2 = [request(r.all_ids + [200 + i], max_new_tokens=5) for i, r in enumerate(turn1)]
        for r in turn2:
            sched.add(r)
        run(sched, ex)
        outputs[radix] = ([r.output_ids for r in turn1 + turn2], [r.cached_tokens for r in turn2])
        cache = sched.cache
        assert cache.request_slots.num_free == cache.max_running_requests
    assert outputs[True][0] == outputs[False][0]
    assert all(c > 256 for c in outputs[True][1]) and outputs[False][1] == [0, 0, 0]
