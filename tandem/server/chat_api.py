"""/v1/chat/completions: messages rendered by the chat template (with tools, `chat_prompt.py`), one engine
request per choice (`calls.py`), and each choice's text split into reasoning, content and tool calls
(`chat_output.py`) as it streams or at once.

Tools (`tools/`): tool_choice `auto` parses the output for calls; `required` and a named function are
enforced by structured output, an EBNF grammar of the calls (`tools/grammar.py`) passed as the request's
`ebnf`, so that even a model that would not call a tool returns a valid call. With `--reasoning-parser` and
a prompt that opens the reasoning, the grammar applies only after the reasoning's end token
(`constraint_after_token_id`). A choice that made calls finishes with "tool_calls"."""

from __future__ import annotations

import asyncio
import functools
import json
import time
import uuid
from dataclasses import replace

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from tandem.errors import ConfigError
from tandem.runtime.sampling.params import CONSTRAINT_FIELDS
from tandem.server.calls import (
    begin_call,
    client_gone,
    expand_choices,
    stream_events,
    streaming_response,
    submit_all,
    usage,
    wait_all,
)
from tandem.server.chat_output import ChoiceOutput, message_of
from tandem.server.chat_prompt import ChatSettings, chat_prompt_ids, check_template_kwargs, template_messages
from tandem.server.constraints import constrain
from tandem.server.logprobs import MAX_CHAT_TOP_LOGPROBS, chat_logprobs
from tandem.server.protocol import APIError, ChatCompletionRequest
from tandem.server.reasoning import REASONING_PARSERS, opens_reasoning
from tandem.server.sampling import finish_reason, max_new_tokens_for, sampling_params
from tandem.server.tools.grammar import tool_call_ebnf
from tandem.server.tools.spec import Tool, ToolPlan, plan_tools

router = APIRouter()


def check_chat_options(body: ChatCompletionRequest) -> None:
    if body.top_logprobs is not None and not 0 <= body.top_logprobs <= MAX_CHAT_TOP_LOGPROBS:
        raise APIError(f"top_logprobs must be between 0 and {MAX_CHAT_TOP_LOGPROBS}, got {body.top_logprobs}",
                       param="top_logprobs")
    if body.top_logprobs and not body.logprobs:
        raise APIError("top_logprobs needs logprobs: true", param="top_logprobs")
    if not body.stream_reasoning:
        raise APIError("stream_reasoning: false is not supported (reasoning is streamed as it comes)",
                       param="stream_reasoning")


@functools.lru_cache(maxsize=256)
def _cached_ebnf(parser: str, tools_key: str, parallel: bool) -> str:
    """The grammar of the tools in `tools_key` ([[name, parameters], ...] as JSON), built once per key."""
    tools = [Tool(name, parameters, {}) for name, parameters in json.loads(tools_key)]
    return tool_call_ebnf(parser, tools, parallel)


def _end_token_id(tokenizer, end: str) -> int:
    ids = tokenizer.encode(end, add_special_tokens=False)
    if len(ids) != 1:
        raise APIError(f"tool_choice cannot be enforced after the reasoning: {end!r} is not one token of this "
                       f"tokenizer", param="tool_choice")
    return ids[0]


async def force_tool_call(bridge, params, plan: ToolPlan, settings: ChatSettings, tokenizer, after_reasoning: bool):
    """`params` with the grammar of tool_choice `required` / named (unchanged for none / auto), compiled
    before the request is queued (awaited off the event loop, as `constraints.constrain` does)."""
    if not plan.forced:
        return params
    given = [f for f in CONSTRAINT_FIELDS if getattr(params, f, None) is not None]
    if given:
        raise APIError(f"tool_choice {'required' if len(plan.forced) > 1 else 'with a function'} cannot be "
                       f"combined with another output constraint ({given[0]})", param="tool_choice")
    key = json.dumps([[t.name, t.parameters] for t in plan.forced])  # properties keep their order
    try:
        ebnf = _cached_ebnf(settings.tool_call_parser, key, plan.parallel)
    except Exception as exc:  # xgrammar's message on a schema it cannot compile
        raise APIError(f"the tools' parameters cannot be enforced: {exc}", param="tools") from None
    fmt = REASONING_PARSERS[settings.reasoning_parser] if settings.reasoning_parser else None
    after = _end_token_id(tokenizer, fmt.end) if after_reasoning and fmt is not None else None
    try:
        params = replace(params, ebnf=ebnf, constraint_after_token_id=after)
        await asyncio.wrap_future(bridge.engine.grammar_future(params.constraint))
    except ConfigError as exc:  # the grammar did not compile (xgrammar's message)
        raise APIError(f"the tools cannot be enforced: {exc}", param="tools", code="invalid_grammar") from None
    return params


class _ChatCall:
    """One chat call after submission: its requests, each choice's parse, and how answers are written."""

    def __init__(self, bridge, body: ChatCompletionRequest, model: str, trackeds, settings: ChatSettings,
                 plan: ToolPlan, inside: bool):
        self.bridge, self.body, self.model, self.trackeds = bridge, body, model, trackeds
        self.id, self.created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        self.top_n = (body.logprobs and body.top_logprobs) or 0
        fmt = REASONING_PARSERS[settings.reasoning_parser] if settings.reasoning_parser else None
        self.split = fmt if body.separate_reasoning else None
        parser = settings.tool_call_parser if plan.parse else None
        self.outputs = [ChoiceOutput(self.split, inside, parser, plan.by_name(), plan.parallel) for _ in trackeds]

    def chunk(self, choice: dict) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [choice]}

    def reason(self, i: int, req) -> str | None:
        reason = finish_reason(req)
        return "tool_calls" if reason == "stop" and self.outputs[i].called_tools else reason

    def logprobs(self, ids, lps, tops):
        return chat_logprobs(self.bridge.token_texts, ids, lps, tops, self.top_n) if self.body.logprobs else None

    def make_chunk(self, i, delta, ids, lps, tops, reason) -> list[dict]:
        out = self.outputs[i]
        deltas = (out.feed(delta) if delta else []) + (out.finish() if reason is not None else [])
        logprobs = self.logprobs(ids, lps, tops) if ids else None
        if logprobs is not None and not deltas:
            deltas = [{}]
        chunks = [self.chunk({"index": i, "delta": d, "logprobs": logprobs if k == 0 else None,
                              "finish_reason": None}) for k, d in enumerate(deltas)]
        if reason is not None:
            chunks.append(self.chunk({"index": i, "delta": {}, "logprobs": None,
                                      "finish_reason": self.reason(i, self.trackeds[i].req)}))
        return chunks

    def stream(self, queue: asyncio.Queue, stop: list[str]):
        include_usage = bool(self.body.stream_options and self.body.stream_options.include_usage)
        usage_chunk = None
        if include_usage:
            usage_chunk = lambda: {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                                   "model": self.model, "choices": [], "usage": usage(self.trackeds)}
        head = [self.chunk({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                            "finish_reason": None}) for i in range(len(self.trackeds))]
        return streaming_response(stream_events(self.bridge, self.trackeds, queue, stop, self.make_chunk,
                                                usage_chunk, head))

    def answer(self) -> dict:
        choices = []
        for i, t in enumerate(self.trackeds):
            req, out = t.req, self.outputs[i]
            message = message_of(out.feed(self.bridge.text_of(req)) + out.finish(), self.split is not None)
            logprobs = None
            if self.body.logprobs:
                tops = req.output_top_logprobs if self.top_n else [None] * len(req.output_ids)
                logprobs = self.logprobs(req.output_ids, req.output_logprobs, tops)
            choices.append({"index": i, "message": message, "logprobs": logprobs, "finish_reason": self.reason(i, req)})
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": choices, "usage": usage(self.trackeds)}


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    bridge, model = begin_call(body, request)
    settings: ChatSettings = request.app.state.chat
    check_chat_options(body)
    plan = plan_tools(body.tools, body.tool_choice, body.parallel_tool_calls, settings.tool_call_parser)
    kwargs = check_template_kwargs(body.chat_template_kwargs)
    prompts = bridge.engine.prompts
    ids, text = await bridge.run_blocking(chat_prompt_ids, prompts, settings, template_messages(body.messages),
                                          plan.template_tools, kwargs)
    fmt = REASONING_PARSERS[settings.reasoning_parser] if settings.reasoning_parser else None
    inside = fmt is not None and opens_reasoning(text, fmt)
    requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    # no limit asked: the rest of the context (as vLLM and SGLang do for chat)
    params = sampling_params(body, max_new_tokens_for(requested, len(ids), bridge.context_length, None, param))
    params = await constrain(request, bridge, params, "chat")
    params = await force_tool_call(bridge, params, plan, settings, prompts.tokenizer, inside)
    queue: asyncio.Queue = asyncio.Queue()
    trackeds = submit_all(bridge, *expand_choices([ids], [params], params.n), queue, "chat",
                          top_logprobs_num=(body.top_logprobs or 0) if body.logprobs else 0,
                          output_logprobs=body.logprobs)
    call = _ChatCall(bridge, body, model, trackeds, settings, plan, inside)
    if body.stream:
        return call.stream(queue, params.stop)
    if not await wait_all(bridge, trackeds, queue, request):
        return client_gone()
    return JSONResponse(call.answer())
