"""One chat choice's generated text -> OpenAI's assistant message (non-streaming) or its deltas (streaming).

The text goes through the reasoning parser (when the server has one and the request wants reasoning
separated) and then the tool-call parser (when the request's tools are parsed); each step streams, and the
non-streaming message is built from the same deltas (`message_of`), so streamed and non-streamed answers
agree by construction. Deltas are OpenAI's: {"reasoning_content": text} (SGLang's and vLLM's field),
{"content": text}, and per call {"tool_calls": [{"index", "id", "type", "function": {"name", "arguments": ""}}]}
once, then {"tool_calls": [{"index", "function": {"arguments": fragment}}]}."""

from __future__ import annotations

from tandem.server.reasoning import ReasoningFormat, ReasoningStream
from tandem.server.tools.stream import CallArguments, CallStart, ToolCallStream


class ChoiceOutput:
    """`reasoning`: the format to split off (None: no split), `inside`: the prompt opened it; `tool_parser`:
    a --tool-call-parser name, or None when the output is not parsed for calls."""

    def __init__(self, reasoning: ReasoningFormat | None = None, inside: bool = False,
                 tool_parser: str | None = None, tools: dict | None = None, parallel: bool = True):
        self.reasoning = ReasoningStream(reasoning, inside) if reasoning is not None else None
        self.tools = ToolCallStream(tool_parser, tools or {}, parallel) if tool_parser is not None else None

    def feed(self, text: str) -> list[dict]:
        return self._deltas(text, final=False)

    def finish(self) -> list[dict]:
        return self._deltas("", final=True)

    @property
    def called_tools(self) -> bool:
        return self.tools is not None and bool(self.tools.calls)

    def _deltas(self, text: str, final: bool) -> list[dict]:
        deltas = []
        if self.reasoning is not None:
            thought, text = self.reasoning.finish() if final else self.reasoning.feed(text)
            if thought:
                deltas.append({"reasoning_content": thought})
        if self.tools is None:
            if text:
                deltas.append({"content": text})
            return deltas
        events = self.tools.feed(text) if text else []
        if final:
            events += self.tools.finish()
        for event in events:
            deltas.append(_event_delta(event))
        return deltas


def _event_delta(event) -> dict:
    if isinstance(event, CallStart):
        return {"tool_calls": [{"index": event.index, "id": event.id, "type": "function",
                                "function": {"name": event.name, "arguments": ""}}]}
    if isinstance(event, CallArguments):
        return {"tool_calls": [{"index": event.index, "function": {"arguments": event.fragment}}]}
    return {"content": event}


def message_of(deltas: list[dict], reasoning: bool) -> dict:
    """The assistant message the deltas add up to (`reasoning`: the reasoning_content field is present)."""
    content, thought, calls = [], [], []
    for delta in deltas:
        content.append(delta.get("content", ""))
        thought.append(delta.get("reasoning_content", ""))
        for call in delta.get("tool_calls", ()):
            if "id" in call:
                calls.append({"id": call["id"], "type": "function",
                              "function": {"name": call["function"]["name"], "arguments": ""}})
            calls[call["index"]]["function"]["arguments"] += call["function"]["arguments"]
    text = "".join(content)
    message = {"role": "assistant", "content": text if text or not calls else None}
    if reasoning:
        message["reasoning_content"] = "".join(thought) or None
    if calls:
        message["tool_calls"] = calls
    return message
