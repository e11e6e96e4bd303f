"""Chunked pipeline prefill: the chunks of one long prompt flow through the stages back to back (stage 0
holds chunk i + 1 while stage 1 still computes chunk i, an order the ranks record), and the tokens and
logprobs are still exactly those of the single-process run, for a hybrid model (Gated DeltaNet state carried
across chunks) and a dense one (KV of earlier chunks)."""

from __future__ import annotations

import pytest

from support.pipeline import steps_sent_ahead
from tandem import Engine
from tandem.runtime.sampling.params import SamplingParams
from tandem.runtime.scheduling.cache_manager import CacheManager
from tandem.runtime.scheduling.scheduler import Request, Scheduler

GREEDY = {"temperature": 0, "max_new_tokens": 5, "ignore_eos": True}
PROMPT = [(7 * i + 3) % 250 + 1 for i in range(48)]


@pytest.mark.parametrize("kind", ["qwen3_5", "llama"])
def test_prompt_chunks_flow_back_to_back_and_tokens_are_exact(ckpt, kind):
    model_dir = ckpt(kind)
    with Engine(model_dir, dtype="float32", chunked_prefill_size=8, progress=False) as single:
        expected = single.generate(input_ids=[PROMPT], sampling_params=GREEDY, return_logprob=True)[0]
    with Engine(model_dir, pp_size=2, dtype="float32", chunked_prefill_size=8, progress=False) as engine:
        got = engine.generate(input_ids=[PROMPT], sampling_params=GREEDY, return_logprob=True)[0]
        report = engine.stage_report()
    assert got["output_ids"] == expected["output_ids"]
    assert got["meta_info"]["output_token_logprobs"] == expected["meta_info"]["output_token_logprobs"]
    # the 6 chunks of the one prompt (its first 6 steps): some chunk i + 1 was sent to the stages before the
    # last stage had finished chunk i
    first = report[-1]["steps_run"][0][0]
    overlapped = [i for i in steps_sent_ahead(report) if i - first < len(PROMPT) // 8 - 1]
    assert overlapped, f"prompt chunks never overlapped across stages: {report[-1]['steps_run'][:6]}"


def test_scheduler_plans_the_next_chunk_while_the_previous_is_in_flight():
    sched = Scheduler(CacheManager(256, 16, 4, hybrid=False, radix_cache=False), 128, 8)
    req = Request(list(range(1, 21)), SamplingParams(max_new_tokens=2))
    sched.add(req)
    first, _ = sched.next_step()
    second, _ = sched.next_step(busy={req.rid}, num_micro_batches=2)
    third, _ = sched.next_step(busy={req.rid}, num_micro_batches=2)
    assert [(s.prefix_len, s.num_tokens) for st in (first, second, third) for s in st.spans] == \
        [(0, 8), (8, 8), (16, 4)]
    assert (first.sample, second.sample, third.sample) == ([False], [False], [True])
    assert sched.next_step(busy={req.rid}, num_micro_batches=2) is None  # the sampling chunk must come back
    wants_logprobs = Request(list(range(1, 21)), SamplingParams(max_new_tokens=2), input_logprobs_wanted=True)
    sched.add(wants_logprobs)
    step, planned = sched.next_step(busy={req.rid})
    assert planned == [wants_logprobs]
    assert sched.next_step(busy={req.rid, wants_logprobs.rid}, num_micro_batches=2) is None
