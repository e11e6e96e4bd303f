"""Request bodies of the HTTP API (pydantic models) and the OpenAI-style error type.

Models are strict about types ("temperature": "hot" is an error, not a string to parse). A field Tandem
does not implement is never silently ignored: `unknown_fields(body)` lists the fields a body carries
beyond its model (a field set to null counts as absent), and the endpoints answer them with a 400 naming
the first (`check_known_fields`). The few fields accepted and ignored on purpose are declared here
(`user`) and listed in docs/server.md. Anything a model cannot express (value ranges that depend on the
engine, such as the context length) is checked by the endpoints."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class APIError(Exception):
    """An error answered as OpenAI does: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, message: str, status: int = 400, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.status, self.type, self.param, self.code = message, status, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    # extra fields are kept so that `check_known_fields` can name them in its 400
    model_config = ConfigDict(strict=True, extra="allow")


def unknown_fields(model: BaseModel, prefix: str = "", handled: tuple[str, ...] = ()) -> list[str]:
    """Dotted names of the fields `model` (and the models inside it: messages, stream_options) carries beyond
    its declared ones, null ones aside."""
    names = [prefix + k for k, v in (model.model_extra or {}).items() if v is not None and k not in handled]
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            names += unknown_fields(value, f"{prefix}{name}.")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, BaseModel):
                    names += unknown_fields(item, f"{prefix}{name}.{i}.")
    return names


def check_known_fields(body: BaseModel, handled: tuple[str, ...] = ()) -> None:
    """400 naming the first field of `body` that Tandem does not implement (`handled`: top-level fields that
    another module reads from the raw body)."""
    unknown = unknown_fields(body, handled=handled)
    if unknown:
        raise APIError(f"{unknown[0]} is not supported by this server (Tandem does not implement it; see "
                       f"docs/server.md for the fields it accepts)", param=unknown[0], code="unsupported_field")


class StreamOptions(_Strict):
    include_usage: bool = False


class _SamplingFields(_Strict):
    """Sampling fields shared by /v1/completions and /v1/chat/completions (OpenAI names + extensions)."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # extensions (SGLang / vLLM names)
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool message: the call it answers
    reasoning_content: str | None = None  # an assistant's earlier reasoning (templates may render it)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    chat_template_kwargs: dict[str, Any] | None = None  # extra variables for the chat template
    separate_reasoning: bool = True  # SGLang: with --reasoning-parser, reasoning into reasoning_content
    stream_reasoning: bool = True  # SGLang: reasoning streamed as it comes (false is not implemented)


class GenerateRequest(_Strict):
    """SGLang's native /generate: `text` or `input_ids` (one prompt or a list), raw sampling_params."""

    text: str | list[str] | None = None
    input_ids: list[int] | list[list[int]] | None = None
    sampling_params: dict[str, Any] | list[dict[str, Any]] | None = None
    stream: bool = False
    return_logprob: bool = False
    logprob_start_len: int = -1
    top_logprobs_num: int = 0
    rid: str | None = None



class TokenizeRequest(_Strict):
    """SGLang's /tokenize: one text or a list."""

    model: str | None = None
    prompt: str | list[str]
    add_special_tokens: bool = True


class DetokenizeRequest(_Strict):
    """SGLang's /detokenize: token ids, or a list of them."""

    model: str | None = None
    tokens: list[int] | list[list[int]]
    skip_special_tokens: bool = True
