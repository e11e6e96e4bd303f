"""What every endpoint does with one HTTP call: the preamble (`begin_call`: model name, fields Tandem does
not implement, per-call caps, engine health), the engine requests it submits (`submit_all`, one per
completion: `expand_choices`), waiting for them (`wait_all`, aborting them all if the client goes away),
usage, and the server-sent-events body shared by the streaming endpoints (`stream_events`).

Every request of one HTTP call shares an asyncio queue (see `bridge.py`). When the client goes away, every
request of the call is aborted so that its cache slot is freed."""

from __future__ import annotations

import asyncio
import json

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from tandem.server import constraints
from tandem.server.bridge import EngineBridge, TextStream, Tracked, wait_finished
from tandem.server.limits import check_caps
from tandem.server.protocol import APIError, check_known_fields
from tandem.server.sampling import check_unsupported, finish_reason

# request fields `constraints.constrain` reads from the raw body (structured output); every other field a body
# carries beyond its model is refused by `check_known_fields`
CONSTRAINT_FIELDS = constraints.REQUEST_FIELDS


def begin_call(body, request: Request) -> tuple[EngineBridge, str]:
    """The checks every OpenAI call starts with; returns the bridge and the served model name."""
    bridge: EngineBridge = request.app.state.bridge
    model = check_model(request, body.model)
    check_known_fields(body, handled=CONSTRAINT_FIELDS)
    check_unsupported(body)
    check_caps(body)
    bridge.check_healthy()
    return bridge, model


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def check_model(request: Request, name: str | None) -> str:
    state = request.app.state
    if name is not None and name not in state.model_names:
        raise APIError(f"The model `{name}` does not exist; this server serves `{state.served_model_name}`.",
                       status=404, param="model", code="model_not_found")
    return state.served_model_name


def usage(trackeds: list[Tracked]) -> dict:
    prompt = sum(len(t.req.prompt_ids) for t in trackeds)
    completion = sum(len(t.req.output_ids) for t in trackeds)
    cached = sum(t.req.cached_tokens for t in trackeds)  # prompt tokens served by the radix prefix cache
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


async def wait_all(bridge: EngineBridge, trackeds: list[Tracked], queue: asyncio.Queue, request: Request) -> bool:
    """Wait until every request finished (True); abort them all if the client goes away first (False)."""
    try:
        finished = await wait_finished(trackeds, queue, request)
    finally:
        for t in trackeds:
            bridge.abort(t)
    for t in trackeds:
        error = bridge.failure(t.req)
        if error is not None:
            raise error
    return finished


def client_gone() -> Response:
    return Response(status_code=499)  # nginx's "client closed request": nobody reads it


def submit_all(bridge: EngineBridge, prompts: list[list[int]], params: list, queue: asyncio.Queue,
               endpoint: str, input_logprobs: bool = False, top_logprobs_num: int = 0,
               output_logprobs: bool = True) -> list[Tracked]:
    bridge.admit(len(prompts))
    trackeds: list[Tracked] = []
    try:
        for i, (ids, p) in enumerate(zip(prompts, params)):
            trackeds.append(bridge.submit(ids, p, queue, i, input_logprobs=input_logprobs, endpoint=endpoint,
                                          top_logprobs_num=top_logprobs_num, output_logprobs=output_logprobs))
    except BaseException:
        for t in trackeds:
            bridge.abort(t)
        raise
    return trackeds


def expand_choices(prompts: list[list[int]], params: list, runs: int) -> tuple[list[list[int]], list]:
    """One engine request per completion: `runs` per prompt, prompt by prompt (choice j: `for_choice(j)`)."""
    flat_prompts, flat_params = [], []
    for ids, p in zip(prompts, params):
        for j in range(runs):
            flat_prompts.append(ids)
            flat_params.append(p.for_choice(j))
    return flat_prompts, flat_params


def best_of(trackeds: list[Tracked], runs: int, n: int) -> list[Tracked]:
    """Per prompt, the n of its `runs` completions with the highest cumulative logprob, best first (vLLM's
    best_of); all of them, in order, when runs == n."""
    if runs == n:
        return trackeds
    chosen = []
    for start in range(0, len(trackeds), runs):
        group = trackeds[start:start + runs]
        chosen += sorted(group, key=lambda t: -sum(t.req.output_logprobs))[:n]
    return chosen


class _Choices:
    """Per-choice streaming state: the text stream and how many tokens' logprobs were sent."""

    def __init__(self, bridge: EngineBridge, trackeds: list[Tracked], stop: list[str]):
        self.streams = [TextStream(bridge, stop) for _ in trackeds]
        self.cursors = [0] * len(trackeds)

    def new_tokens(self, i: int, req) -> tuple[list[int], list[float], list]:
        """Tokens of choice i not sent yet, with their logprobs and top pairs (None each without top-N)."""
        n = min(len(req.output_ids), len(req.output_logprobs))
        if req.top_logprobs_num:
            n = min(n, len(req.output_top_logprobs))
        start, self.cursors[i] = self.cursors[i], max(self.cursors[i], n)
        tops = req.output_top_logprobs[start:n] if req.top_logprobs_num else [None] * max(0, n - start)
        return req.output_ids[start:n], req.output_logprobs[start:n], tops


async def stream_events(bridge: EngineBridge, trackeds: list[Tracked], queue: asyncio.Queue, stop: list[str],
                        make_chunk, usage_chunk=None, head: list[dict] = ()):
    """SSE body shared by the streaming endpoints. make_chunk(i, delta_text, token_ids, logprobs, top_pairs,
    finish_reason) returns the chunk dict, a list of chunks, or None to send nothing."""
    choices = _Choices(bridge, trackeds, stop)
    try:
        for chunk in head:
            yield sse(chunk)
        done: set[int] = set()
        while len(done) < len(trackeds):
            i = await queue.get()
            if i in done:
                continue
            req = trackeds[i].req
            finished = req.finished
            error = bridge.failure(req)
            if error is not None:
                yield sse(error.body())
                break
            delta = choices.streams[i].update(req)
            ids, lps, tops = choices.new_tokens(i, req)
            reason = finish_reason(req) if finished else None
            if delta or ids or finished:
                chunks = make_chunk(i, delta, ids, lps, tops, reason)
                for chunk in chunks if isinstance(chunks, list) else [chunks] if chunks is not None else []:
                    yield sse(chunk)
            if finished:
                done.add(i)
        else:
            if usage_chunk is not None:
                yield sse(usage_chunk())
        yield "data: [DONE]\n\n"
    finally:  # also on client disconnect (the generator is cancelled/closed): free the cache slots
        for t in trackeds:
            bridge.abort(t)


def streaming_response(body) -> StreamingResponse:
    return StreamingResponse(body, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
