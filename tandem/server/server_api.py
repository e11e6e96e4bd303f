"""SGLang's server endpoints beyond /generate, in SGLang's shapes: /tokenize, /detokenize,
/get_server_info, /health_generate, /flush_cache and /version.

- POST /tokenize {"prompt": text or texts, "add_special_tokens"} -> {"tokens", "count", "max_model_len"}
- POST /detokenize {"tokens": ids or lists of ids, "skip_special_tokens"} -> {"text"}
- GET /get_server_info: the server's settings (engine arguments, chat parsers, limits; never the API key),
  "version" and "internal_states" (the scheduler's cache statistics)
- GET /health_generate: 200 once a one-token greedy generation went through the whole pipeline; 503
  when the engine is down or the generation failed
- POST or GET /flush_cache: empties the radix prefix cache (200); 400 while requests run or wait
- GET /version: {"version"}"""

from __future__ import annotations

import asyncio
from importlib import metadata

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from tandem.runtime.sampling.params import SamplingParams
from tandem.server.bridge import EngineBridge
from tandem.server.calls import check_model, submit_all, wait_all
from tandem.server.protocol import APIError, DetokenizeRequest, TokenizeRequest, check_known_fields

router = APIRouter()


def version() -> str:
    try:
        return metadata.version("tandem")
    except metadata.PackageNotFoundError:
        return "unknown"


def _tokenizer(bridge: EngineBridge):
    tokenizer = bridge.engine.prompts.tokenizer
    if tokenizer is None:
        raise APIError("this model has no tokenizer", param="model")
    return tokenizer


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request):
    check_model(request, body.model)
    check_known_fields(body)
    bridge: EngineBridge = request.app.state.bridge
    tokenizer = _tokenizer(bridge)
    texts = [body.prompt] if isinstance(body.prompt, str) else body.prompt

    def encode():
        return [tokenizer.encode(t, add_special_tokens=body.add_special_tokens) for t in texts]

    tokens = await bridge.run_blocking(encode)
    if isinstance(body.prompt, str):
        return {"tokens": tokens[0], "count": len(tokens[0]), "max_model_len": bridge.context_length}
    return {"tokens": tokens, "count": [len(t) for t in tokens], "max_model_len": bridge.context_length}


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request):
    check_model(request, body.model)
    check_known_fields(body)
    bridge: EngineBridge = request.app.state.bridge
    tokenizer = _tokenizer(bridge)
    batch = bool(body.tokens) and isinstance(body.tokens[0], list)
    lists = body.tokens if batch else [body.tokens]
    vocab = bridge.engine.prompts.vocab_size
    for ids in lists:
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise APIError(f"tokens contains {bad[0]}, which is not a token id in [0, {vocab})", param="tokens")

    def decode():
        return [tokenizer.decode(ids, skip_special_tokens=body.skip_special_tokens) for ids in lists]

    texts = await bridge.run_blocking(decode)
    return {"text": texts if batch else texts[0]}


@router.get("/get_server_info")
async def server_info(request: Request):
    state = request.app.state
    stats = state.bridge.engine.cache_stats()
    return {**state.server_info, "version": version(), "internal_states": [stats]}


@router.get("/health_generate")
async def health_generate(request: Request):
    bridge: EngineBridge = request.app.state.bridge
    ok, reason = bridge.health()
    if not ok or bridge.draining:
        return JSONResponse({"status": "error", "error": reason or "the server is shutting down"}, status_code=503)
    queue: asyncio.Queue = asyncio.Queue()
    params = SamplingParams(max_new_tokens=1, temperature=0.0, ignore_eos=True)
    try:
        trackeds = submit_all(bridge, [[0]], [params], queue, "health_generate", output_logprobs=False)
        if not await wait_all(bridge, trackeds, queue, request):
            return JSONResponse({"status": "error", "error": "client gone"}, status_code=499)
    except APIError as exc:
        return JSONResponse({"status": "error", "error": exc.message}, status_code=503)
    if len(trackeds[0].req.output_ids) != 1:
        return JSONResponse({"status": "error", "error": "the test generation produced no token"}, status_code=503)
    return JSONResponse({"status": "ok"})


@router.api_route("/flush_cache", methods=["GET", "POST"])
async def flush_cache(request: Request):
    bridge: EngineBridge = request.app.state.bridge
    if not bridge.engine.flush_cache():
        return PlainTextResponse("Cache not flushed: requests are running or waiting. Retry when the server is "
                                 "idle.", status_code=400)
    return PlainTextResponse("Cache flushed.\n")


@router.get("/version")
async def get_version():
    return {"version": version()}
