"""The step messages between the scheduler and the ranks: `StepInput` (what one forward step computes, a few
ints per request) and `StepOutput` (what the last stage sampled). Both are msgspec structs, so the rank
processes receive and return them through a typed codec (`tandem.executors.messages`), never pickle."""

from __future__ import annotations

import msgspec

from tandem.layers.forward_batch import Span
from tandem.runtime.sampler import SamplingParams

RequestKey = int | str


class StepInput(msgspec.Struct):
    spans: list[Span]
    input_ids: list[int]  # packed tokens of all spans
    sample: list[bool]  # per span: sample a token after its last token
    params: list[SamplingParams]  # per span
    keys: list[RequestKey]  # per span: request id (for per-request generators)
    reset_slots: list[int] = []  # slots newly given to requests
    release_keys: list[RequestKey] = []  # finished requests
    input_logprobs: list[bool] | None = None  # per span: also return logprobs of its prompt tokens
    next_ids: list[int | None] | None = None  # per span: the prompt token after the span, if any
    prompt_lens: list[int] | None = None  # per span: its request's prompt length (positions past it are output)
    top_logprobs_num: list[int] | None = None  # per span: top-N logprobs wanted with its sampled / prompt tokens


class StepOutput(msgspec.Struct):
    tokens: list[int | None]  # per span (None where not sampled)
    logprobs: list[float | None]
    input_logprobs: list[list[float] | None] | None = None
    top_logprobs: list[list[tuple[int, float]] | None] | None = None  # per span: [(token id, logprob)]
    errors: list[str | None] | None = None  # per span: why it got no token (numeric failure), else None
    # per span with input_logprobs and top_logprobs_num > 0: per prompt position [(token id, logprob)]
    input_top_logprobs: list[list[list[tuple[int, float]]] | None] | None = None
