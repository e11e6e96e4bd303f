"""The continuous-batching scheduler against a fake executor (no model): admission by free slots, chunked
prefill next to running decodes, stop strings / stop_token_ids / EOS / ignore_eos, context limit, abort,
and the plumbing of prompt logprobs across prefill chunks."""

import pytest

from tandem.errors import ConfigError
from tandem.runtime.sampler import SamplingParams
from tandem.runtime.scheduler import Request, Scheduler
from tandem.runtime.step import StepInput, StepOutput

VOCAB = 100


def next_token(ids: list[int]) -> int:
    """The fake model: the next token is the last one plus one."""
    return (ids[-1] + 1) % VOCAB


class FakeExecutor:
    """Keeps each slot's cached tokens like a KV cache would, checks that every span continues its slot's
    cache exactly, and samples `next_token(cached ids)`. Prompt logprobs are the target token ids (as floats),
    so a test can see which prompt token each reported logprob belongs to."""

    def __init__(self, num_slots: int):
        self.cache: dict[int, list[int]] = {slot: [] for slot in range(num_slots)}
        self.steps: list[StepInput] = []
        self.released: list = []

    def execute(self, step: StepInput) -> StepOutput:
        self.steps.append(step)
        self.released.extend(step.release_keys)
        assert len({s.slot for s in step.spans}) == len(step.spans), "one span per slot"
        for slot in step.reset_slots:
            self.cache[slot] = []
        tokens, logprobs, input_lps = [], [], []
        offset = 0
        for i, span in enumerate(step.spans):
            ids = step.input_ids[offset:offset + span.num_tokens]
            offset += span.num_tokens
            assert span.num_tokens >= 1
            assert span.prefix_len == len(self.cache[span.slot]), "span must continue the slot's cache"
            self.cache[span.slot].extend(ids)
            if step.sample[i]:
                tokens.append(next_token(self.cache[span.slot]))
                logprobs.append(-0.5)
            else:
                tokens.append(None)
                logprobs.append(None)
            if step.input_logprobs and step.input_logprobs[i]:
                targets = ids[1:] + ([step.next_ids[i]] if step.next_ids[i] is not None else [])
                input_lps.append([float(t) for t in targets])
            else:
                input_lps.append(None)
        assert offset == len(step.input_ids)
        return StepOutput(tokens, logprobs, input_lps if step.input_logprobs else None)


def make(num_slots=4, max_len=256, chunk=512, eos=(), decode_text=None):
    return Scheduler(num_slots, max_len, chunk, eos, decode_text), FakeExecutor(num_slots)


def request(prompt, **params) -> Request:
    params.setdefault("max_new_tokens", 4)
    return Request(list(prompt), SamplingParams.from_dict(params))


def step(sched: Scheduler, ex: FakeExecutor):
    planned = sched.next_step()
    if planned is None:
        return None
    st, reqs = planned
    sched.process(st, reqs, ex.execute(st))
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


# ---- admission and slots --------------------------------------------------------------------------------------

def test_admission_is_limited_by_free_slots():
    sched, ex = make(num_slots=2)
    reqs = [request([10 * i + 1, 10 * i + 2], max_new_tokens=3 + i) for i in range(4)]
    for r in reqs:
        sched.add(r)
    st, planned = step(sched, ex)
    assert planned == reqs[:2]
    assert sorted(s.slot for s in st.spans) == [0, 1]
    assert list(sched.waiting) == reqs[2:]
    run(sched, ex)
    for r in reqs:
        assert r.output_ids == expected_continuation(r.prompt_ids, r.params.max_new_tokens)
        assert r.finish_reason == {"type": "length", "length": r.params.max_new_tokens}
    # at no step did more than two requests run, and every request got a slot in [0, 2)
    assert max(len(s.spans) for s in ex.steps) == 2
    assert all(r.slot in (0, 1) for r in reqs)
    # the third request started only after the first finished, in its freed slot, with a reset
    third_first_step = next(i for i, s in enumerate(ex.steps) if reqs[2].slot in s.reset_slots and i > 0)
    assert len(reqs[0].output_ids) == 3 and third_first_step == 3
    assert sorted(sched.free_slots) == [0, 1]
    assert set(ex.released) <= {r.rid for r in reqs}


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
    assert ex.steps[0].reset_slots == [r.slot] and all(not st.reset_slots for st in ex.steps[1:])


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
    sched, ex = make(num_slots=1)
    a = request([1, 2], max_new_tokens=50)
    b = request([7, 8], max_new_tokens=2)
    sched.add(a)
    sched.add(b)
    step(sched, ex)
    step(sched, ex)
    assert sched.running == [a] and list(sched.waiting) == [b]
    assert sched.abort(a.rid) is True
    assert a.finish_reason == {"type": "abort"}
    st, reqs = step(sched, ex)
    assert reqs == [b] and b.slot == a.slot and st.reset_slots == [b.slot]
    assert a.rid in st.release_keys
    run(sched, ex)
    assert b.output_ids == expected_continuation([7, 8], 2)
    assert len(a.output_ids) == 2


def test_abort_waiting_request_and_unknown_id():
    sched, ex = make(num_slots=1)
    a, b = request([1], max_new_tokens=3), request([2], max_new_tokens=3)
    sched.add(a)
    sched.add(b)
    assert sched.abort(b.rid) is True
    assert b.finish_reason == {"type": "abort"} and b.slot is None
    assert sched.abort("no-such-request") is False
    run(sched, ex)
    assert a.output_ids == expected_continuation([1], 3) and b.output_ids == []
    assert all(len(st.spans) == 1 for st in ex.steps)


def test_abort_while_step_in_flight_drops_its_result():
    sched, ex = make()
    a = request([1, 2], max_new_tokens=5)
    sched.add(a)
    st, reqs = sched.next_step()
    out = ex.execute(st)
    sched.abort(a.rid)
    assert sched.process(st, reqs, out) == []
    assert a.output_ids == [] and a.finish_reason == {"type": "abort"}
    assert not sched.has_work and len(sched.free_slots) == 4


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
