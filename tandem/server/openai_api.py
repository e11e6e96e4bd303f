"""OpenAI-compatible endpoints: /v1/completions, /v1/models and /v1/models/{id} (chat is `chat_api.py`).

Each completion asked for (n per prompt, or best_of of which the n with the highest cumulative logprob
are answered) becomes one engine request (`calls.py`). Logprobs are formatted by `logprobs.py`. Streaming
answers are server-sent events: text deltas (with their tokens' logprobs when asked for), a final chunk per
choice carrying its finish_reason, an optional usage chunk (`stream_options.include_usage`), then
`data: [DONE]`."""

from __future__ import annotations

import asyncio
import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from tandem.server.calls import (
    begin_call,
    best_of,
    client_gone,
    expand_choices,
    stream_events,
    streaming_response,
    submit_all,
    usage,
    wait_all,
)
from tandem.server.constraints import constrain
from tandem.server.logprobs import MAX_COMPLETION_LOGPROBS, completion_logprobs, echoed_prompt
from tandem.server.protocol import APIError, CompletionRequest
from tandem.server.sampling import DEFAULT_MAX_NEW_TOKENS, finish_reason, max_new_tokens_for, sampling_params

router = APIRouter()


class _Completion:
    """One /v1/completions call after submission: its requests and how its choices are written."""

    def __init__(self, bridge, body: CompletionRequest, model: str, trackeds, stop: list[str]):
        self.bridge, self.body, self.model, self.trackeds, self.stop = bridge, body, model, trackeds, stop
        self.id, self.created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        self.top_n = body.logprobs or 0
        self.want_logprobs = body.logprobs is not None

    def response(self, choices: list[dict], **extra) -> dict:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": choices, **extra}

    def prompt_text(self, req) -> str:
        return self.bridge.decode(req.prompt_ids) if self.body.echo else ""

    def logprobs_of(self, req, ids, lps, tops, echo: bool, offset: int) -> dict:
        if echo:
            prompt_ids, prompt_lps, prompt_tops = echoed_prompt(req)
            ids, lps, tops = prompt_ids + list(ids), prompt_lps + list(lps), prompt_tops + list(tops)
        return completion_logprobs(self.bridge.token_texts, ids, lps, tops, self.top_n, offset)

    def stream(self, queue: asyncio.Queue):
        include_usage = bool(self.body.stream_options and self.body.stream_options.include_usage)
        sent_echo: set[int] = set()
        offsets = [0] * len(self.trackeds)  # text_offset of each choice's next token

        def make_chunk(i, delta, ids, lps, tops, reason):
            req = self.trackeds[i].req
            echo = i not in sent_echo and self.body.echo
            sent_echo.add(i)
            logprobs = None
            if self.want_logprobs:
                logprobs = self.logprobs_of(req, ids, lps, tops, echo, offsets[i])
                offsets[i] += sum(len(t) for t in logprobs["tokens"])
            text = (self.prompt_text(req) if echo else "") + delta
            return self.response([{"index": i, "text": text, "logprobs": logprobs, "finish_reason": reason}])

        usage_chunk = (lambda: self.response([], usage=usage(self.trackeds))) if include_usage else None
        return streaming_response(stream_events(self.bridge, self.trackeds, queue, self.stop, make_chunk,
                                                usage_chunk))

    def answer(self, chosen) -> dict:
        choices = []
        for i, t in enumerate(chosen):
            req = t.req
            logprobs = None
            if self.want_logprobs:
                tops = req.output_top_logprobs if self.top_n else [None] * len(req.output_ids)
                logprobs = self.logprobs_of(req, req.output_ids, req.output_logprobs, tops, self.body.echo, 0)
            choices.append({"index": i, "text": self.prompt_text(req) + self.bridge.text_of(req),
                            "logprobs": logprobs, "finish_reason": finish_reason(req)})
        return self.response(choices, usage=usage(self.trackeds))


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    bridge, model = begin_call(body, request)
    if body.logprobs is not None and not 0 <= body.logprobs <= MAX_COMPLETION_LOGPROBS:
        raise APIError(f"logprobs must be between 0 and {MAX_COMPLETION_LOGPROBS}, got {body.logprobs}",
                       param="logprobs")
    prompts = await bridge.run_blocking(bridge.engine.prompts.from_prompt, body.prompt, "prompt")
    params = [sampling_params(body, max_new_tokens_for(body.max_tokens, len(ids), bridge.context_length,
                                                       DEFAULT_MAX_NEW_TOKENS))
              for ids in prompts]
    params = await constrain(request, bridge, params, "completions")
    n = params[0].n
    runs = body.best_of or n
    want_logprobs = body.logprobs is not None
    queue: asyncio.Queue = asyncio.Queue()
    trackeds = submit_all(bridge, *expand_choices(prompts, params, runs), queue, "completions",
                          input_logprobs=want_logprobs and body.echo, top_logprobs_num=body.logprobs or 0,
                          output_logprobs=want_logprobs or runs > n)  # best_of ranks by cumulative logprob
    call = _Completion(bridge, body, model, trackeds, params[0].stop)
    if body.stream:
        return call.stream(queue)
    if not await wait_all(bridge, trackeds, queue, request):
        return client_gone()
    return JSONResponse(call.answer(best_of(trackeds, runs, n)))


# ---- /v1/models -----------------------------------------------------------------------------------

def _model_card(state) -> dict:
    return {"id": state.served_model_name, "object": "model", "created": state.created, "owned_by": "tandem",
            "root": state.model_path, "max_model_len": state.bridge.context_length}


@router.get("/v1/models")
async def models(request: Request):
    return {"object": "list", "data": [_model_card(request.app.state)]}


@router.get("/v1/models/{model:path}")
async def model(model: str, request: Request):
    state = request.app.state
    if model not in state.model_names:
        raise APIError(f"The model `{model}` does not exist; this server serves `{state.served_model_name}`.",
                       status=404, param="model", code="model_not_found")
    return _model_card(state)
