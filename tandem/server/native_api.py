"""Native endpoints (SGLang's shapes): /generate, /health, /metrics and /get_model_info.

/generate takes `text` or `input_ids` (one prompt or a list) and raw engine `sampling_params` (one dict,
or one per prompt; `n` > 1 answers n results per prompt, prompt by prompt) and answers {"text", "output_ids",
"meta_info"} per result, as `Engine.generate` does (both through `tandem.prompts`), with SGLang's
`return_logprob`, `logprob_start_len` and `top_logprobs_num`; with "stream": true (one prompt, n = 1) it
sends cumulative results as server-sent events."""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST

from tandem.errors import ConfigError
from tandem.prompts import build_result
from tandem.runtime.sampling.params import SamplingParams
from tandem.server.bridge import EngineBridge, Tracked
from tandem.server.calls import client_gone, expand_choices, sse, submit_all, wait_all
from tandem.server.constraints import constrain
from tandem.server.limits import check_caps
from tandem.server.protocol import APIError, GenerateRequest, check_known_fields
from tandem.server.sampling import config_error, max_new_tokens_for

router = APIRouter()


def _params(bridge: EngineBridge, body: GenerateRequest, prompts: list[list[int]]) -> list[SamplingParams]:
    raw = body.sampling_params
    if isinstance(raw, list):
        if len(raw) != len(prompts):
            raise APIError(f"got {len(raw)} sampling_params for {len(prompts)} prompts", param="sampling_params")
        dicts = raw
    else:
        dicts = [raw or {}] * len(prompts)
    out = []
    for ids, values in zip(prompts, dicts):
        try:
            params = SamplingParams.from_dict(values)
        except ConfigError as exc:
            raise config_error(exc, openai_names=False) from None
        except TypeError as exc:
            raise APIError(f"invalid sampling_params: {exc}", param="sampling_params") from None
        if "max_new_tokens" in values:  # the default (16) is cut at the context length instead
            max_new_tokens_for(params.max_new_tokens, len(ids), bridge.context_length, None,
                               "sampling_params.max_new_tokens")
        out.append(params)
    return out


def _result(bridge: EngineBridge, t: Tracked, body: GenerateRequest, rid: str) -> dict:
    return build_result(t.req, bridge.decode, body.return_logprob, body.logprob_start_len, id=rid,
                        e2e_latency=time.monotonic() - t.arrival)


@router.post("/generate")
async def generate(body: GenerateRequest, request: Request):
    bridge: EngineBridge = request.app.state.bridge
    check_known_fields(body)
    check_caps(body)
    bridge.check_healthy()
    prompts, batch = await bridge.run_blocking(bridge.engine.prompts.from_either, body.text, body.input_ids, "text",
                                               "input_ids")
    if not prompts:
        raise APIError("no prompt given", param="text" if body.text is not None else "input_ids")
    params = await constrain(request, bridge, _params(bridge, body, prompts), "generate")
    if body.stream and (batch or params[0].n > 1):
        raise APIError("stream=true takes one prompt and n = 1", param="stream")
    if body.top_logprobs_num < 0:
        raise APIError(f"top_logprobs_num must be >= 0, got {body.top_logprobs_num}", param="top_logprobs_num")
    batch = batch or any(p.n > 1 for p in params)
    flat_prompts, flat_params = [], []
    for ids, p in zip(prompts, params):
        more_prompts, more_params = expand_choices([ids], [p], p.n)
        flat_prompts += more_prompts
        flat_params += more_params
    queue: asyncio.Queue = asyncio.Queue()
    trackeds = submit_all(bridge, flat_prompts, flat_params, queue, "generate",
                          input_logprobs=body.return_logprob and body.logprob_start_len >= 0,
                          top_logprobs_num=body.top_logprobs_num if body.return_logprob else 0,
                          output_logprobs=body.return_logprob)
    base = body.rid or f"gen-{trackeds[0].req.rid}"
    rids = [base] if not batch else [f"{base}-{i}" for i in range(len(trackeds))]

    if body.stream:
        async def events():
            t = trackeds[0]
            try:
                while True:
                    await queue.get()
                    error = bridge.failure(t.req)
                    if error is not None:
                        yield sse(error.body())
                        break
                    yield sse(_result(bridge, t, body, rids[0]))
                    if t.req.finished:
                        break
                yield "data: [DONE]\n\n"
            finally:
                bridge.abort(t)

        return StreamingResponse(events(), media_type="text/event-stream")

    if not await wait_all(bridge, trackeds, queue, request):
        return client_gone()
    results = [_result(bridge, t, body, rid) for t, rid in zip(trackeds, rids)]
    return JSONResponse(results if batch else results[0])


@router.get("/health")
async def health(request: Request):
    bridge: EngineBridge = request.app.state.bridge
    ok, reason = bridge.health()
    if ok:
        return JSONResponse({"status": "ok"})
    return JSONResponse({"status": "error", "error": reason}, status_code=503)


@router.get("/metrics")
async def metrics(request: Request):
    state = request.app.state
    bridge: EngineBridge = state.bridge
    return Response(state.metrics.render(bridge.engine, bridge.health()[0]), media_type=CONTENT_TYPE_LATEST)


@router.get("/get_model_info")
async def model_info(request: Request):
    state = request.app.state
    return {**state.bridge.engine.model_info(), "served_model_name": state.served_model_name, "is_generation": True}
