"""OpenAI request fields -> the engine's `SamplingParams`, with the checks that give 400s instead of
surprises: n and best_of in range, logit_bias ids in the vocabulary, the fields still unsupported (suffix,
best_of with stream), and max_tokens within the context left by the prompt.

The output-length limit is `max_new_tokens` in the engine (`SamplingParams`, /generate) and `max_tokens`
(chat also `max_completion_tokens`) in the OpenAI API. Defaults, as vLLM has them: 16 for the engine,
/generate and /v1/completions (OpenAI's completions default); the rest of the context for
/v1/chat/completions. A default never asks for more than the context left by the prompt; an explicit
limit that does is a 400 in the server (the engine stops such a request at the context length)."""

from __future__ import annotations

from tandem.errors import ConfigError
from tandem.runtime.sampling.params import MAX_N, SamplingParams
from tandem.server.protocol import APIError

DEFAULT_MAX_NEW_TOKENS = SamplingParams().max_new_tokens  # 16: /generate, /v1/completions and the engine

# SamplingParams field -> the OpenAI request field a ConfigError about it should name
_PARAM_NAMES = {"max_new_tokens": "max_tokens", "temperature": "temperature", "top_k": "top_k", "top_p": "top_p",
                "min_p": "min_p", "seed": "seed", "ignore_eos": "ignore_eos", "stop_token_ids": "stop_token_ids",
                "stop": "stop", "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
                "repetition_penalty": "repetition_penalty", "logit_bias": "logit_bias", "n": "n"}
# request fields passed to SamplingParams as they are
_PASSED = ("temperature", "top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids", "presence_penalty",
           "frequency_penalty", "repetition_penalty", "logit_bias", "n")


def config_error(exc: ConfigError, openai_names: bool = True) -> APIError:
    """A 400 naming the field the engine's message is about (OpenAI's name for it, or the raw one)."""
    message = str(exc)
    first = message.split(" ", 1)[0]
    if first not in _PARAM_NAMES:
        return APIError(message, param="sampling_params" if first == "unknown" else None)
    return APIError(message, param=_PARAM_NAMES[first] if openai_names else f"sampling_params.{first}")


def check_unsupported(body) -> None:
    """400s for what the server does not do: suffix (insertion), and best_of > n while streaming (the best
    completions are known only at the end; OpenAI and vLLM refuse it too)."""
    if getattr(body, "suffix", None):
        raise APIError("suffix is not supported", param="suffix")
    best_of = getattr(body, "best_of", None)
    if best_of is not None:
        if not isinstance(best_of, int) or best_of < body.n:
            raise APIError(f"best_of must be >= n ({body.n}), got {best_of}", param="best_of")
        if best_of > MAX_N:
            raise APIError(f"best_of must be at most {MAX_N}, got {best_of}", param="best_of")
        if body.stream and best_of > body.n:
            raise APIError("best_of > n cannot be streamed: the best completions are known only at the end",
                           param="best_of")


def max_new_tokens_for(requested: int | None, prompt_len: int, context_length: int, default: int | None,
                       param: str = "max_tokens") -> int:
    """Tokens to generate: `requested`, or `default` capped to the context left (None: all of it)."""
    room = context_length - prompt_len
    if requested is None:
        return room if default is None else min(default, room)
    if requested < 0:
        raise APIError(f"{param} must be a non-negative integer, got {requested}", param=param)
    if requested > room:
        raise APIError(f"This model's maximum context length is {context_length} tokens. However, you requested "
                       f"{prompt_len + requested} tokens ({prompt_len} in the prompt, {requested} for the "
                       f"completion). Please reduce the prompt or {param}.", param=param,
                       code="context_length_exceeded")
    return requested


def sampling_params(body, max_new_tokens: int) -> SamplingParams:
    """The request's SamplingParams (n included: the endpoint makes one engine request per completion)."""
    values = {"max_new_tokens": max_new_tokens, "ignore_eos": body.ignore_eos}
    for name in _PASSED:
        value = getattr(body, name)
        if value is not None:
            values[name] = value
    try:
        params = SamplingParams.from_dict(values)
    except ConfigError as exc:
        raise config_error(exc) from None
    return params


def finish_reason(req) -> str | None:
    reason = req.finish_reason
    return None if reason is None else reason.get("type", "stop")
