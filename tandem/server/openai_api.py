"""OpenAI-compatible endpoints: /v1/completions, /v1/chat/completions and /v1/models.

Each prompt becomes one engine request; every request of one HTTP call shares an asyncio queue (see
`bridge.py`). Streaming answers are server-sent events: text deltas, a final chunk per choice carrying
its finish_reason, an optional usage chunk (`stream_options.include_usage`), then `data: [DONE]`. When
the client goes away, every request of the call is aborted so that its cache slot is freed."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from tandem.server.bridge import EngineBridge, TextStream, Tracked, wait_finished
from tandem.server.limits import check_caps
from tandem.server.protocol import APIError, ChatCompletionRequest, CompletionRequest
from tandem.server.sampling import (
    DEFAULT_MAX_NEW_TOKENS,
    check_unsupported,
    finish_reason,
    max_new_tokens_for,
    sampling_params,
)

router = APIRouter()


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
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


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
               endpoint: str, input_logprobs: bool = False) -> list[Tracked]:
    bridge.admit(len(prompts))
    trackeds: list[Tracked] = []
    try:
        for i, (ids, p) in enumerate(zip(prompts, params)):
            trackeds.append(bridge.submit(ids, p, queue, i, input_logprobs=input_logprobs, endpoint=endpoint))
    except BaseException:
        for t in trackeds:
            bridge.abort(t)
        raise
    return trackeds


class _Choices:
    """Per-choice streaming state: the text stream and how many tokens' logprobs were sent."""

    def __init__(self, bridge: EngineBridge, trackeds: list[Tracked], stop: list[str]):
        self.streams = [TextStream(bridge, stop) for _ in trackeds]
        self.cursors = [0] * len(trackeds)

    def new_tokens(self, i: int, req) -> tuple[list[int], list[float]]:
        n = min(len(req.output_ids), len(req.output_logprobs))
        start, self.cursors[i] = self.cursors[i], max(self.cursors[i], n)
        return req.output_ids[start:n], req.output_logprobs[start:n]


async def stream_events(bridge: EngineBridge, trackeds: list[Tracked], queue: asyncio.Queue, stop: list[str],
                        make_chunk, usage_chunk=None, head: list[dict] = ()):
    """SSE body shared by both endpoints. make_chunk(i, delta_text, token_ids, logprobs, finish_reason)
    returns the chunk dict (or None to skip)."""
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
            ids, lps = choices.new_tokens(i, req)
            reason = finish_reason(req) if finished else None
            if delta or ids or finished:
                chunk = make_chunk(i, delta, ids, lps, reason)
                if chunk is not None:
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


def _streaming_response(body) -> StreamingResponse:
    return StreamingResponse(body, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# ---- /v1/completions ------------------------------------------------------------------------------

def _completion_logprobs(bridge: EngineBridge, req, ids: list[int], lps: list[float], echo_prompt: bool,
                         offset: int) -> dict:
    tokens, values = [], []
    if echo_prompt:
        tokens += [bridge.decode([t]) for t in req.prompt_ids]
        values += [None] + list(req.input_logprobs[: len(req.prompt_ids) - 1])
    tokens += [bridge.decode([t]) for t in ids]
    values += list(lps)
    offsets, pos = [], offset
    for tok in tokens:
        offsets.append(pos)
        pos += len(tok)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": None, "text_offset": offsets}


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    bridge: EngineBridge = request.app.state.bridge
    model = check_model(request, body.model)
    check_unsupported(body)
    check_caps(body)
    bridge.check_healthy()
    if body.logprobs is not None and not 0 <= body.logprobs <= 20:
        raise APIError("logprobs must be between 0 and 20", param="logprobs")
    prompts = await bridge.run_blocking(bridge.engine.prompts.from_prompt, body.prompt, "prompt")
    params = [sampling_params(body, max_new_tokens_for(body.max_tokens, len(ids), bridge.context_length,
                                                       DEFAULT_MAX_NEW_TOKENS))
              for ids in prompts]
    want_logprobs = body.logprobs is not None
    queue: asyncio.Queue = asyncio.Queue()
    trackeds = submit_all(bridge, prompts, params, queue, "completions", input_logprobs=want_logprobs and body.echo)
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    stop = params[0].stop

    def prompt_text(req) -> str:
        return bridge.decode(req.prompt_ids) if body.echo else ""

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        sent_echo: set[int] = set()

        def make_chunk(i, delta, ids, lps, reason):
            req = trackeds[i].req
            echo = i not in sent_echo and body.echo
            sent_echo.add(i)
            text = (prompt_text(req) if echo else "") + delta
            logprobs = (_completion_logprobs(bridge, req, ids, lps, echo, 0) if want_logprobs else None)
            return {"id": rid, "object": "text_completion", "created": created, "model": model,
                    "choices": [{"index": i, "text": text, "logprobs": logprobs, "finish_reason": reason}]}

        def usage_chunk():
            return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [],
                    "usage": usage(trackeds)}

        return _streaming_response(stream_events(bridge, trackeds, queue, stop, make_chunk,
                                                 usage_chunk if include_usage else None))

    if not await wait_all(bridge, trackeds, queue, request):
        return client_gone()
    choices = []
    for i, t in enumerate(trackeds):
        req = t.req
        head = prompt_text(req)
        logprobs = (_completion_logprobs(bridge, req, req.output_ids, req.output_logprobs, body.echo, 0)
                    if want_logprobs else None)
        choices.append({"index": i, "text": head + bridge.text_of(req), "logprobs": logprobs,
                        "finish_reason": finish_reason(req)})
    return JSONResponse({"id": rid, "object": "text_completion", "created": created, "model": model,
                         "choices": choices, "usage": usage(trackeds)})


# ---- /v1/chat/completions -------------------------------------------------------------------------

def check_chat_options(body: ChatCompletionRequest) -> None:
    if body.tools:
        raise APIError("tools are not supported", param="tools")
    if body.response_format and body.response_format.get("type", "text") != "text":
        raise APIError("only response_format type 'text' is supported", param="response_format")


def _chat_logprobs(bridge: EngineBridge, ids: list[int], lps: list[float]) -> dict:
    content = []
    for t, lp in zip(ids, lps):
        token = bridge.decode([t])
        content.append({"token": token, "logprob": lp, "bytes": list(token.encode()), "top_logprobs": []})
    return {"content": content}


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    bridge: EngineBridge = request.app.state.bridge
    model = check_model(request, body.model)
    check_unsupported(body)
    check_caps(body)
    bridge.check_healthy()
    if body.top_logprobs is not None and not 0 <= body.top_logprobs <= 20:
        raise APIError("top_logprobs must be between 0 and 20", param="top_logprobs")
    check_chat_options(body)
    ids = await bridge.run_blocking(bridge.engine.prompts.from_chat,
                                    [{"role": m.role, "content": m.content} for m in body.messages])
    requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    # no limit asked: the rest of the context (as vLLM and SGLang do for chat)
    params = sampling_params(body, max_new_tokens_for(requested, len(ids), bridge.context_length, None, param))
    queue: asyncio.Queue = asyncio.Queue()
    trackeds = submit_all(bridge, [ids], [params], queue, "chat")
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def chunk(choice: dict) -> dict:
        return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [choice]}

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def make_chunk(i, delta, ids_, lps, reason):
            if not delta and reason is None and not body.logprobs:
                return None
            logprobs = _chat_logprobs(bridge, ids_, lps) if body.logprobs else None
            return chunk({"index": i, "delta": {"content": delta} if delta else {}, "logprobs": logprobs,
                          "finish_reason": reason})

        def usage_chunk():
            return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": [], "usage": usage(trackeds)}

        head = [chunk({"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                       "finish_reason": None})]
        return _streaming_response(stream_events(bridge, trackeds, queue, params.stop, make_chunk,
                                                 usage_chunk if include_usage else None, head))

    if not await wait_all(bridge, trackeds, queue, request):
        return client_gone()
    req = trackeds[0].req
    logprobs = _chat_logprobs(bridge, req.output_ids, req.output_logprobs) if body.logprobs else None
    return JSONResponse({
        "id": rid, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": bridge.text_of(req)},
                     "logprobs": logprobs, "finish_reason": finish_reason(req)}],
        "usage": usage(trackeds)})


# ---- /v1/models -----------------------------------------------------------------------------------

@router.get("/v1/models")
async def models(request: Request):
    state = request.app.state
    return {"object": "list", "data": [{"id": state.served_model_name, "object": "model", "created": state.created,
                                        "owned_by": "tandem", "root": state.model_path,
                                        "max_model_len": state.bridge.context_length}]}
