"""Continuous batching: a waiting queue and a running set of requests, each holding one cache slot.

Every step packs one decode token for each decoding request plus prefill chunks of admitted requests up
to the token budget (chunked prefill, so long prompts do not stall decoding). Requests finish on
max_new_tokens, EOS (unless ignore_eos), stop_token_ids, stop strings, the context limit, or abort.

`requeue_all()` forgets every cache (the ranks were restarted): running requests go back to the front of
the queue and are prefilled again from their prompt plus the tokens they already generated."""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from tandem.errors import ConfigError
from tandem.layers.forward_batch import Span
from tandem.runtime.sampler import SamplingParams
from tandem.runtime.step import StepInput, StepOutput

_ids = itertools.count()


def check_prompt_length(num_tokens: int, max_len: int) -> None:
    """A prompt needs at least one token, and room for at least one new token in the context."""
    if num_tokens == 0:
        raise ConfigError("the prompt is empty: at least one token is needed")
    if num_tokens >= max_len:
        raise ConfigError(f"the prompt has {num_tokens} tokens, but the context length is "
                          f"{max_len} (prompt + at least one new token must fit)")


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    rid: object = field(default_factory=lambda: next(_ids))
    input_logprobs_wanted: bool = False
    output_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    input_logprobs: list[float] = field(default_factory=list)
    slot: int | None = None
    num_cached: int = 0  # tokens of prompt + output already in the cache
    finish_reason: dict | None = None
    on_update: Callable | None = None  # called after each step that changed this request

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids


class Scheduler:
    def __init__(self, num_slots: int, max_len: int, chunk_size: int, eos_token_ids=(),
                 decode_text: Callable[[list[int]], str] | None = None):
        self.max_len, self.chunk_size = max_len, chunk_size
        self.eos_token_ids = set(eos_token_ids)
        self.decode_text = decode_text
        self.num_slots = num_slots
        self.free_slots = deque(range(num_slots))
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._released: list = []

    def add(self, req: Request) -> None:
        check_prompt_length(len(req.prompt_ids), self.max_len)
        if req.params.max_new_tokens == 0:
            req.finish_reason = {"type": "length", "length": 0}
            return
        self.waiting.append(req)

    def abort(self, rid, message: str | None = None) -> bool:
        """Finish request `rid` with {"type": "abort"} (plus `message`, the reason, when the engine ends it
        rather than its client). False if there is no such unfinished request."""
        for req in list(self.waiting) + self.running:
            if req.rid == rid:
                self._finish(req, {"type": "abort", "message": message} if message else {"type": "abort"})
                return True
        return False

    def requeue_all(self) -> list[Request]:
        """Every cache is gone: put the running requests back at the front of the queue, in the order they
        were admitted, to be prefilled again from position 0 (prompt + tokens already generated; the
        sampler rebuilds its history from what is fed through the model). Returns them."""
        requeued = list(self.running)
        for req in requeued:
            req.slot, req.num_cached = None, 0
        self.waiting.extendleft(reversed(requeued))
        self.running.clear()
        self.free_slots = deque(range(self.num_slots))
        self._released.clear()  # the fresh ranks hold no state for them
        return requeued

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def next_step(self, busy: set = frozenset(), num_micro_batches: int = 1) -> tuple[StepInput, list[Request]] | None:
        """Plan one step over requests not in `busy` (their previous step is still in flight). With
        micro-batches, each step takes about 1/num_micro_batches of the running requests."""
        while self.waiting and self.free_slots:
            req = self.waiting.popleft()
            req.slot = self.free_slots.popleft()
            self.running.append(req)
        cap = -(-len(self.running) // num_micro_batches)
        reqs, spans, ids, sample, resets = [], [], [], [], []
        budget = self.chunk_size
        for req in self.running:
            if req.rid in busy:
                continue
            if len(reqs) >= cap:
                break
            pending = len(req.all_ids) - req.num_cached
            if req.num_cached and pending == 1:  # decoding
                n = 1
            elif budget > 0:
                n = min(pending, budget)
            else:
                continue
            budget -= n
            if req.num_cached == 0:
                resets.append(req.slot)
            spans.append(Span(req.slot, req.num_cached, n))
            ids.extend(req.all_ids[req.num_cached:req.num_cached + n])
            sample.append(req.num_cached + n == len(req.all_ids))
            reqs.append(req)
        if not reqs:
            return None
        released, self._released = self._released, []
        wants = [r.input_logprobs_wanted and r.num_cached < len(r.prompt_ids) for r in reqs]
        next_ids = [r.prompt_ids[r.num_cached + s.num_tokens] if r.num_cached + s.num_tokens < len(r.prompt_ids)
                    else None for r, s in zip(reqs, spans)]
        step = StepInput(spans, ids, sample, [r.params for r in reqs], [r.rid for r in reqs], resets, released,
                         input_logprobs=wants if any(wants) else None, next_ids=next_ids if any(wants) else None,
                         prompt_lens=[len(r.prompt_ids) for r in reqs])
        return step, reqs

    def process(self, step: StepInput, reqs: list[Request], out: StepOutput) -> list[Request]:
        """Apply a step's results; returns the requests it gave a token (some of them now finished).
        A request aborted while the step ran is skipped: its result is dropped."""
        updated = []
        for i, req in enumerate(reqs):
            if req.finished:  # aborted while the step ran
                continue
            req.num_cached += step.spans[i].num_tokens
            if out.input_logprobs and out.input_logprobs[i] is not None:
                # logprob j of the span is that of position prefix_len + j + 1; a request prefilled again
                # (requeue_all) already holds the first ones, and its span runs past the prompt
                start = len(req.input_logprobs) - step.spans[i].prefix_len
                end = len(req.prompt_ids) - 1 - step.spans[i].prefix_len
                req.input_logprobs.extend(out.input_logprobs[i][max(start, 0):max(end, 0)])
            if out.errors and out.errors[i]:
                self._finish(req, {"type": "abort", "message": out.errors[i]})
                updated.append(req)
                continue
            if out.tokens[i] is None:
                continue
            token = out.tokens[i]
            req.output_ids.append(token)
            req.output_logprobs.append(out.logprobs[i])
            reason = self._finish_reason(req, token)
            if reason:
                self._finish(req, reason)
            updated.append(req)
        return updated

    def _finish_reason(self, req: Request, token: int) -> dict | None:
        p = req.params
        if not p.ignore_eos and token in self.eos_token_ids:
            return {"type": "stop", "matched": token}
        if token in p.stop_token_ids:
            return {"type": "stop", "matched": token}
        if p.stop and self.decode_text is not None:
            text = self.decode_text(req.output_ids)
            for stop in p.stop:
                if stop in text:
                    return {"type": "stop", "matched": stop}
        if len(req.output_ids) >= p.max_new_tokens:
            return {"type": "length", "length": len(req.output_ids)}
        if len(req.all_ids) >= self.max_len:
            return {"type": "length", "length": len(req.output_ids)}
        return None

    def _finish(self, req: Request, reason: dict) -> None:
        req.finish_reason = reason
        if req in self.waiting:
            self.waiting.remove(req)
        if req in self.running:
            self.running.remove(req)
            self.free_slots.append(req.slot)
            self._released.append(req.rid)
