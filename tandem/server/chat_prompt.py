"""Chat messages -> the prompt: the checkpoint's chat template (or `--chat-template`'s) rendered by
transformers' `apply_chat_template`, with the request's tools, the assistant's earlier `tool_calls`, `tool`
messages and `chat_template_kwargs` (e.g. {"enable_thinking": false}).

`ChatSettings` holds the server's chat options (`--tool-call-parser`, `--reasoning-parser`,
`--chat-template`), checked at start-up. Message content is a string, null, or a list of text parts;
an assistant's `tool_calls[].function.arguments` (JSON text in OpenAI's API) is given to the template as
the object it encodes, since the templates iterate over it (Qwen3.5's) or serialize it themselves."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tandem.errors import ConfigError
from tandem.prompts import PromptError
from tandem.server.protocol import APIError
from tandem.server.reasoning import REASONING_PARSERS
from tandem.server.tools.formats import TOOL_CALL_PARSERS

# apply_chat_template's own arguments: not for chat_template_kwargs to override
_RESERVED_KWARGS = {"conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
                    "continue_final_message", "tokenize", "padding", "truncation", "max_length",
                    "return_tensors", "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs"}


@dataclass(frozen=True)
class ChatSettings:
    tool_call_parser: str | None = None
    reasoning_parser: str | None = None
    chat_template: str | None = None  # Jinja text, from --chat-template's file

    def __post_init__(self) -> None:
        if self.tool_call_parser is not None and self.tool_call_parser not in TOOL_CALL_PARSERS:
            raise ConfigError(f"--tool-call-parser must be one of {sorted(TOOL_CALL_PARSERS)}, "
                              f"got {self.tool_call_parser!r}")
        if self.reasoning_parser is not None and self.reasoning_parser not in REASONING_PARSERS:
            raise ConfigError(f"--reasoning-parser must be one of {sorted(REASONING_PARSERS)}, "
                              f"got {self.reasoning_parser!r}")


def load_chat_template(path: str | None) -> str | None:
    """--chat-template: a Jinja file (SGLang also takes names of built-in templates; Tandem has none)."""
    if path is None:
        return None
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--chat-template must be a Jinja template file; {path!r} is not a file")
    return file.read_text()


def _content_text(content, field: str) -> str | None:
    if not isinstance(content, list):
        return content
    if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
        raise APIError("only text content parts are supported", param=field)
    return "".join(part["text"] for part in content)


def _tool_calls(calls: list, field: str) -> list[dict]:
    out = []
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise APIError(f"{field}.{j} must be {{\"type\": \"function\", \"function\": {{\"name\", \"arguments\"}}}}",
                           param=f"{field}.{j}")
        arguments = function.get("arguments", "{}")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments or "{}")
            except ValueError:
                arguments = None
        if not isinstance(arguments, dict):
            raise APIError(f"{field}.{j}.function.arguments must be a JSON object", param=f"{field}.{j}.function")
        out.append({**call, "type": "function", "function": {**function, "arguments": arguments}})
    return out


def template_messages(messages) -> list[dict]:
    """The request's messages (protocol.ChatMessage) as the dicts a chat template reads."""
    out = []
    for i, message in enumerate(messages):
        field = f"messages.{i}"
        item = {"role": message.role, "content": _content_text(message.content, f"{field}.content") or ""}
        for name in ("name", "tool_call_id", "reasoning_content"):
            value = getattr(message, name)
            if value is not None:
                item[name] = value
        if message.tool_calls:
            item["tool_calls"] = _tool_calls(message.tool_calls, f"{field}.tool_calls")
        out.append(item)
    return out


def check_template_kwargs(kwargs) -> dict:
    if kwargs is None:
        return {}
    reserved = sorted(set(kwargs) & _RESERVED_KWARGS)
    if reserved:
        raise APIError(f"chat_template_kwargs may not set {reserved}", param="chat_template_kwargs")
    return dict(kwargs)


def render_chat_prompt(tokenizer, settings: ChatSettings, messages: list[dict], tools: list[dict] | None,
                       kwargs: dict) -> str:
    """The prompt text, ending with the assistant's turn."""
    template = settings.chat_template or getattr(tokenizer, "chat_template", None)
    if tokenizer is None or not template:
        raise PromptError("this model has no chat template: pass the prompt as text or token ids, or start the "
                          "server with --chat-template", "messages")
    try:
        return tokenizer.apply_chat_template(messages, tools=tools, chat_template=template, tokenize=False,
                                             add_generation_prompt=True, **kwargs)
    except Exception as exc:
        raise PromptError(f"the chat template rejected the messages: {exc}", "messages") from None


def chat_prompt_ids(prompts, settings: ChatSettings, messages: list[dict], tools: list[dict] | None,
                    kwargs: dict) -> tuple[list[int], str]:
    """(checked token ids, prompt text) of a chat request; `prompts` is the engine's PromptBuilder."""
    text = render_chat_prompt(prompts.tokenizer, settings, messages, tools, kwargs)
    # the template already wrote any special tokens (BOS included) it wants
    return prompts.check(prompts.tokenizer.encode(text, add_special_tokens=False), "messages"), text
