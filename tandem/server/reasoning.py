"""`--reasoning-parser qwen3`: a model's `<think>` ... `</think>` as `reasoning_content`, the rest as content.

Qwen3 writes `<think>` itself when it thinks; Qwen3.5's chat template opens `<think>` in the prompt (the
model then starts inside its reasoning), and with `enable_thinking: false` both templates write an empty
`<think>\n\n</think>` block there. `opens_reasoning(prompt_text)` tells the two apart from the rendered
prompt: the output starts inside the reasoning when the prompt's last `<think>` is not closed.

`ReasoningStream` splits text as it streams; the non-streaming answer is the same split of the whole text,
so both agree. Reasoning that does not end (no `</think>` before the output stops) is all reasoning. Tags
that may be arriving are held back; whitespace at the start of the reasoning and of the content, and at the
end of the reasoning, is dropped."""

from __future__ import annotations

from dataclasses import dataclass

from tandem.server.tools.stream import partial_suffix


@dataclass(frozen=True)
class ReasoningFormat:
    start: str
    end: str


REASONING_PARSERS = {"qwen3": ReasoningFormat("<think>", "</think>")}


def opens_reasoning(prompt_text: str, fmt: ReasoningFormat) -> bool:
    """Whether the prompt leaves a reasoning block open (the output starts inside it)."""
    start = prompt_text.rfind(fmt.start)
    return start >= 0 and prompt_text.find(fmt.end, start) < 0


class ReasoningStream:
    """feed(text) / finish() -> (reasoning delta, content delta). `inside`: the prompt opened the block."""

    def __init__(self, fmt: ReasoningFormat, inside: bool):
        self.fmt = fmt
        self.state = "reasoning" if inside else "start"  # start: not known yet whether the output thinks
        self.buffer = ""
        self.reasoning_started = False  # leading whitespace of the reasoning is dropped
        self.content_started = False  # leading whitespace of the content is dropped
        self.space = ""  # reasoning whitespace that waits for more reasoning

    def feed(self, text: str) -> tuple[str, str]:
        self.buffer += text
        reasoning = content = ""
        if self.state == "start":
            head = self.buffer.lstrip()
            if not head or (self.fmt.start.startswith(head)):
                return "", ""  # could still be the opening tag
            if head.startswith(self.fmt.start):
                self.buffer, self.state = head[len(self.fmt.start):], "reasoning"
            else:
                self.state = "content"
        if self.state == "reasoning":
            end = self.buffer.find(self.fmt.end)
            if end < 0:
                keep = partial_suffix(self.buffer, self.fmt.end)
                reasoning = self._reasoning(self.buffer[:len(self.buffer) - keep])
                self.buffer = self.buffer[len(self.buffer) - keep:]
                return reasoning, ""
            reasoning = self._reasoning(self.buffer[:end])
            self.buffer, self.state, self.space = self.buffer[end + len(self.fmt.end):], "content", ""
        if self.state == "content":
            content, self.buffer = self._content(self.buffer), ""
        return reasoning, content

    def finish(self) -> tuple[str, str]:
        rest, self.buffer = self.buffer, ""
        if self.state == "reasoning":
            return self._reasoning(rest), ""
        return "", self._content(rest)

    def _reasoning(self, text: str) -> str:
        if not self.reasoning_started:
            text = text.lstrip()
            if not text:
                return ""
            self.reasoning_started = True
        body = text.rstrip()
        if not body:
            self.space += text
            return ""
        out, self.space = self.space + body, text[len(body):]
        return out

    def _content(self, text: str) -> str:
        if not self.content_started:
            text = text.lstrip()
            self.content_started = bool(text)
        return text
