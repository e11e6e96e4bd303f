"""Chunked pipeline prefill: the chunks of one long prompt flow through the stages back to back (stage 0
computes chunk i + 1 while stage 1 still computes chunk i), and the tokens and logprobs are still exactly
those of the single-process run, for a hybrid model (Gated DeltaNet state carried across chunks) and a
dense one (KV of earlier chunks)."""

from __future__ import annotations

import pytest

from tandem import Engine
from tandem.runtime.sampling.params import SamplingParams
from tandem.runtime.scheduling.cache_manager import CacheManager
from tandem.runtime.scheduling.scheduler import Request, Scheduler

GREEDY = {"temperature": 0, "max_new_tokens": 5, "ignore_eos": True}
PROMPT = [(7 * i + 3) % 250 + 1 for i in range(48)]


def chunks_in_flight_together(report: list[dict]) -> list[int]:
    """Steps i for which stage 0 started step i+1 before stage 1 had finished step i (every rank runs every
    step in order, so the i-th interval of each stage is step i): a fact of order, not of speed."""
    stage0, stage1 = report[0]["step_times"], report[-1]["step_times"]
    return [i for i in range(min(len(stage0), len(stage1)) - 1) if stage0[i + 1][0] < stage1[i][1]]


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
    # the 6 chunks of the one prompt: some chunk i + 1 started on stage 0 before stage 1 finished chunk i
    prefill_steps = len(PROMPT) // 8
    overlapped = [i for i in chunks_in_flight_together(report) if i < prefill_steps - 1]
    assert overlapped, f"prompt chunks never overlapped across stages: {report[0]['step_times'][:6]}"


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
