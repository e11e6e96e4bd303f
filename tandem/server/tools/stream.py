"""Generated text -> content and tool calls, as it streams (`ToolCallStream`); the non-streaming answer is
the same parse of the whole text at once, so the two always agree.

Text outside `<tool_call>` blocks is content; text that could be the start of `<tool_call>` is held back
until it is known not to be, so no call markup ever reaches the content. A block is parsed when its
`</tool_call>` arrives: a valid call becomes a `CallStart` (index, id, name) followed by its
`CallArguments` fragments; a malformed block, or a call to a function that is not among the tools, is left
as content, as is a block still open when the output ends. Whitespace between calls, and around them, is
dropped. With `parallel` false only the first call is kept (later ones are dropped, as SGLang does)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from tandem.server.tools.formats import TOOL_CALL_END, TOOL_CALL_PARSERS, TOOL_CALL_START, argument_fragments


@dataclass(frozen=True)
class CallStart:
    index: int
    id: str
    name: str


@dataclass(frozen=True)
class CallArguments:
    index: int
    fragment: str


def partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a proper beginning of `tag`."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class ToolCallStream:
    """One choice's parse (see the module docstring). `tools` maps names to `spec.Tool`s."""

    def __init__(self, parser: str, tools: dict, parallel: bool = True):
        self.parse_block, self.tools, self.parallel = TOOL_CALL_PARSERS[parser], tools, parallel
        self.buffer = ""  # text not decided yet: a held-back tag start, or an open block
        self.in_block = False
        self.calls: list[tuple[str, dict]] = []  # (name, arguments) of the calls made
        self.pending_space = ""  # whitespace after content, sent only if more content follows
        self.after_call = False
        self.block_space = ""  # whitespace before the open block

    def feed(self, text: str) -> list:
        self.buffer += text
        events: list = []
        while self.buffer:
            if self.in_block:
                end = self.buffer.find(TOOL_CALL_END)
                if end < 0:
                    break
                inner, self.buffer = self.buffer[:end], self.buffer[end + len(TOOL_CALL_END):]
                self.in_block = False
                events += self._close_block(inner)
                continue
            start = self.buffer.find(TOOL_CALL_START)
            if start < 0:
                keep = partial_suffix(self.buffer, TOOL_CALL_START)
                events += self._content(self.buffer[:len(self.buffer) - keep])
                self.buffer = self.buffer[len(self.buffer) - keep:]
                break
            events += self._content(self.buffer[:start])
            self.block_space, self.pending_space = self.pending_space, ""  # dropped if the block is a call
            self.buffer = self.buffer[start + len(TOOL_CALL_START):]
            self.in_block = True
        return events

    def finish(self) -> list:
        """Whatever is left when the output ends: an unfinished block, or a held-back tag start, as content."""
        rest = self.buffer
        if self.in_block:
            rest, self.pending_space = TOOL_CALL_START + rest, self.block_space + self.pending_space
        self.buffer, self.in_block = "", False
        events = self._content(rest)
        if not self.calls and self.pending_space:
            events.append(self.pending_space)
        self.pending_space = ""
        return events

    def _close_block(self, inner: str) -> list:
        parsed = self.parse_block(inner, self.tools)
        if parsed is None:
            self.pending_space = self.block_space + self.pending_space
            return self._content(TOOL_CALL_START + inner + TOOL_CALL_END)
        self.after_call = True
        if self.calls and not self.parallel:
            return []
        index = len(self.calls)
        self.calls.append(parsed)
        name, arguments = parsed
        return [CallStart(index, new_call_id(), name)] + [CallArguments(index, f) for f in argument_fragments(arguments)]

    def _content(self, text: str) -> list:
        """Content events for `text`: whitespace right after a call is dropped, trailing whitespace waits."""
        if self.after_call:
            text = text.lstrip()
            if not text:
                return []
            self.after_call = False
        body = text.rstrip()
        if not body:
            self.pending_space += text
            return []
        out = self.pending_space + body
        self.pending_space = text[len(body):]
        return [out]
