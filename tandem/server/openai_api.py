"""OpenAI-compatible endpoints: /v1/completions, /v1/chat/completions and /v1/models.

Each completion asked for (n per prompt, or best_of of which the n with the highest cumulative logprob
are answered) becomes one engine request; every request of one HTTP call shares an asyncio queue (see
`bridge.py`). Logprobs are formatted by `logprobs.py`. Streaming answers are server-sent events: text
deltas (with their tokens' logprobs when asked for), a final chunk per choice carrying its finish_reason, an
optional usage chunk (`stream_options.include_usage`), then `data: [DONE]`. When the client goes away,
every request of the call is aborted so that its cache slot is freed."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from tandem.server.bridge import EngineBridge, TextStream, Tracked, wait_finished
from tandem.server.constraints import constrain
from tandem.server.limits import check_caps
from tandem.server.logprobs import (
    MAX_CHAT_TOP_LOGPROBS,
    MAX_COMPLETION_LOGPROBS,
    chat_logprobs,
    completion_logprobs,
    echoed_prompt,
)
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
    """SSE body shared by both endpoints. make_chunk(i, delta_text, token_ids, logprobs, top_pairs,
    finish_reason) returns the chunk dict (or None to skip)."""
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
                chunk = make_chunk(i, delta, ids, lps, tops, reason)
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

@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    bridge: EngineBridge = request.app.state.bridge
    model = check_model(request, body.model)
    check_unsupported(body)
    check_caps(body)
    bridge.check_healthy()
    if body.logprobs is not None and not 0 <= body.logprobs <= MAX_COMPLETION_LOGPROBS:
        raise APIError(f"logprobs must be between 0 and {MAX_COMPLETION_LOGPROBS}, got {body.logprobs}",
                       param="logprobs")
    prompts = await bridge.run_blocking(bridge.engine.prompts.from_prompt, body.prompt, "prompt")
    vocab_size = bridge.engine.prompts.vocab_size
    params = [sampling_params(body, max_new_tokens_for(body.max_tokens, len(ids), bridge.context_length,
                                                       DEFAULT_MAX_NEW_TOKENS), vocab_size)
              for ids in prompts]
    params = await constrain(request, bridge, params, "completions")
    n = params[0].n
    runs = body.best_of or n
    want_logprobs = body.logprobs is not None
    top_n = body.logprobs or 0
    queue: asyncio.Queue = asyncio.Queue()
    trackeds = submit_all(bridge, *expand_choices(prompts, params, runs), queue, "completions",
                          input_logprobs=want_logprobs and body.echo, top_logprobs_num=top_n,
                          output_logprobs=want_logprobs or runs > n)  # best_of ranks by cumulative logprob
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    stop = params[0].stop

    def prompt_text(req) -> str:
        return bridge.decode(req.prompt_ids) if body.echo else ""

    def logprobs_of(req, ids, lps, tops, echo: bool, offset: int) -> dict:
        if echo:
            prompt_ids, prompt_lps, prompt_tops = echoed_prompt(req)
            ids, lps, tops = prompt_ids + list(ids), prompt_lps + list(lps), prompt_tops + list(tops)
        return completion_logprobs(bridge.token_texts, ids, lps, tops, top_n, offset)

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        sent_echo: set[int] = set()
        offsets = [0] * len(trackeds)  # text_offset of each choice's next token

        def make_chunk(i, delta, ids, lps, tops, reason):
            req = trackeds[i].req
            echo = i not in sent_echo and body.echo
            sent_echo.add(i)
            text = (prompt_text(req) if echo else "") + delta
            logprobs = None
            if want_logprobs:
                logprobs = logprobs_of(req, ids, lps, tops, echo, offsets[i])
                offsets[i] += sum(len(t) for t in logprobs["tokens"])
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
    for i, t in enumerate(best_of(trackeds, runs, n)):
        req = t.req
        logprobs = None
        if want_logprobs:
            tops = req.output_top_logprobs if top_n else [None] * len(req.output_ids)
            logprobs = logprobs_of(req, req.output_ids, req.output_logprobs, tops, body.echo, 0)
        choices.append({"index": i, "text": prompt_text(req) + bridge.text_of(req), "logprobs": logprobs,
                        "finish_reason": finish_reason(req)})
    return JSONResponse({"id": rid, "object": "text_completion", "created": created, "model": model,
                         "choices": choices, "usage": usage(trackeds)})


# ---- /v1/chat/completions -------------------------------------------------------------------------

def check_chat_options(body: ChatCompletionRequest) -> None:
    if body.tools:
        raise APIError("tools are not supported", param="tools")
    if body.top_logprobs is not None and not 0 <= body.top_logprobs <= MAX_CHAT_TOP_LOGPROBS:
        raise APIError(f"top_logprobs must be between 0 and {MAX_CHAT_TOP_LOGPROBS}, got {body.top_logprobs}",
                       param="top_logprobs")
    if body.top_logprobs and not body.logprobs:
        raise APIError("top_logprobs needs logprobs: true", param="top_logprobs")


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    bridge: EngineBridge = request.app.state.bridge
    model = check_model(request, body.model)
    check_unsupported(body)
    check_caps(body)
    bridge.check_healthy()
    check_chat_options(body)
    ids = await bridge.run_blocking(bridge.engine.prompts.from_chat,
                                    [{"role": m.role, "content": m.content} for m in body.messages])
    requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    # no limit asked: the rest of the context (as vLLM and SGLang do for chat)
    params = sampling_params(body, max_new_tokens_for(requested, len(ids), bridge.context_length, None, param),
                             bridge.engine.prompts.vocab_size)
    params = await constrain(request, bridge, params, "chat")
    top_n = (body.top_logprobs or 0) if body.logprobs else 0
    queue: asyncio.Queue = asyncio.Queue()
    trackeds = submit_all(bridge, *expand_choices([ids], [params], params.n), queue, "chat",
                          top_logprobs_num=top_n, output_logprobs=body.logprobs)
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def chunk(choice: dict) -> dict:
        return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [choice]}

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def make_chunk(i, delta, ids_, lps, tops, reason):
            if not delta and reason is None and not (body.logprobs and ids_):
                return None
            logprobs = chat_logprobs(bridge.token_texts, ids_, lps, tops, top_n) if body.logprobs else None
            return chunk({"index": i, "delta": {"content": delta} if delta else {}, "logprobs": logprobs,
                          "finish_reason": reason})

        def usage_chunk():
            return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": [], "usage": usage(trackeds)}

        head = [chunk({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                       "finish_reason": None}) for i in range(len(trackeds))]
        return _streaming_response(stream_events(bridge, trackeds, queue, params.stop, make_chunk,
                                                 usage_chunk if include_usage else None, head))

    if not await wait_all(bridge, trackeds, queue, request):
        return client_gone()
    choices = []
    for i, t in enumerate(trackeds):
        req = t.req
        logprobs = None
        if body.logprobs:
            tops = req.output_top_logprobs if top_n else [None] * len(req.output_ids)
            logprobs = chat_logprobs(bridge.token_texts, req.output_ids, req.output_logprobs, tops, top_n)
        choices.append({"index": i, "message": {"role": "assistant", "content": bridge.text_of(req)},
                        "logprobs": logprobs, "finish_reason": finish_reason(req)})
    return JSONResponse({"id": rid, "object": "chat.completion", "created": created, "model": model,
                         "choices": choices, "usage": usage(trackeds)})


# ---- /v1/models -----------------------------------------------------------------------------------

@router.get("/v1/models")
async def models(request: Request):
    state = request.app.state
    return {"object": "list", "data": [{"id": state.served_model_name, "object": "model", "created": state.created,
                                        "owned_by": "tandem", "root": state.model_path,
                                        "max_model_len": state.bridge.context_length}]}
