"""Tool-call and reasoning parsers on hand-written model outputs: well-formed calls (one, several, typed
qwen3_coder values), malformed blocks left as content, and every streamed split of a text adding up to
the non-streamed answer (`chat_output.message_of` over the deltas)."""

from __future__ import annotations

import json
import random

import pytest

from tandem.server.chat_output import ChoiceOutput, message_of
from tandem.server.reasoning import REASONING_PARSERS, opens_reasoning
from tandem.server.tools.spec import check_tools

TOOLS = check_tools([
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"},
                                         "metric": {"type": "boolean"}, "ratio": {"type": "number"},
                                         "tags": {"type": "array", "items": {"type": "string"}},
                                         "where": {"type": "object"}},
        "required": ["city"]}}},
    {"type": "function", "function": {"name": "ping"}},
])
BY_NAME = {t.name: t for t in TOOLS}
QWEN3 = REASONING_PARSERS["qwen3"]


def qwen3_coder_call(name: str, **params) -> str:
    body = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in params.items())
    return f"<tool_call>\n<function={name}>\n{body}</function>\n</tool_call>"


def hermes_call(name: str, arguments: dict) -> str:
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


def parse(text: str, parser: str | None = "qwen3_coder", pieces: list[str] | None = None, reasoning=None,
          inside=False, parallel=True) -> tuple[dict, list[dict]]:
    out = ChoiceOutput(reasoning, inside, parser, BY_NAME, parallel)
    deltas = []
    for piece in pieces if pieces is not None else [text]:
        deltas += out.feed(piece)
    deltas += out.finish()
    return message_of(deltas, reasoning is not None), deltas


def splits(text: str, seed: int) -> list[list[str]]:
    """Character by character, and two random cuttings."""
    rng = random.Random(seed)
    out = [list(text)]
    for _ in range(2):
        cuts = sorted(rng.sample(range(1, len(text)), min(12, len(text) - 1)))
        out.append([text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])])
    return out


def arguments(message) -> list[tuple[str, dict]]:
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message.get("tool_calls", [])]


def test_qwen3_coder_call_with_typed_values_and_content_before():
    text = "Let me check.\n\n" + qwen3_coder_call(
        "get_weather", city="New York\nCity", days="3", metric="true", ratio="0.5", tags='["a", "b"]',
        where='{"lat": 1.5}')
    message, _ = parse(text)
    assert message["content"] == "Let me check."
    assert arguments(message) == [("get_weather", {"city": "New York\nCity", "days": 3, "metric": True, "ratio": 0.5,
                                                   "tags": ["a", "b"], "where": {"lat": 1.5}})]
    call = message["tool_calls"][0]
    assert call["id"].startswith("call_") and call["type"] == "function"


def test_several_calls_both_formats():
    q = qwen3_coder_call("get_weather", city="Paris") + "\n" + qwen3_coder_call("ping") + "\n"
    h = hermes_call("get_weather", {"city": "Paris"}) + "\n" + hermes_call("ping", {})
    for parser, text in (("qwen3_coder", q), ("hermes", h)):
        message, _ = parse(text, parser)
        assert message["content"] is None, parser
        assert arguments(message) == [("get_weather", {"city": "Paris"}), ("ping", {})], parser
        assert len({c["id"] for c in message["tool_calls"]}) == 2
        one, _ = parse(text, parser, parallel=False)
        assert arguments(one) == [("get_weather", {"city": "Paris"})], parser


def test_a_value_that_does_not_convert_stays_text():
    message, _ = parse(qwen3_coder_call("get_weather", city="Rome", days="three"))
    assert arguments(message) == [("get_weather", {"city": "Rome", "days": "three"})]


@pytest.mark.parametrize("parser, text", [
    ("qwen3_coder", "Sure <tool_call>\n<function=get_weather>\n<parameter=city>\nOslo\n</parameter>\n"),  # unclosed
    ("qwen3_coder", qwen3_coder_call("unknown_tool", city="Oslo")),  # not among the tools
    ("qwen3_coder", "<tool_call>\nget_weather(city='Oslo')\n</tool_call>"),  # not the format
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": \n</tool_call>'),  # bad JSON
    ("hermes", hermes_call("nope", {})),
    ("hermes", "<tool_call>\n[1, 2]\n</tool_call> tail"),
])
def test_malformed_blocks_are_left_as_content(parser, text):
    message, deltas = parse(text, parser)
    assert "tool_calls" not in message
    assert message["content"] == text
    for pieces in splits(text, 3):
        assert parse(text, parser, pieces)[0]["content"] == message["content"]


def test_a_good_call_after_a_malformed_block_is_still_a_call():
    bad = "<tool_call>\nnot a call\n</tool_call>"
    message, _ = parse(bad + "\n" + qwen3_coder_call("ping"))
    assert message["content"] == bad
    assert arguments(message) == [("ping", {})]


def test_no_markup_reaches_streamed_content():
    text = "Checking <tool now. " + qwen3_coder_call("get_weather", city="Lima") + " done"
    for pieces in splits(text, 1):
        _, deltas = parse(text, "qwen3_coder", pieces)
        streamed = "".join(d.get("content", "") for d in deltas)
        assert "<tool_call>" not in streamed and "<function=" not in streamed and "<parameter" not in streamed
        assert streamed == "Checking <tool now.done"  # whitespace around a call is dropped


@pytest.mark.parametrize("parser, text", [
    ("qwen3_coder", "Plan: " + qwen3_coder_call("get_weather", city="Kyiv", days="2", tags='["x"]') + "\n"
     + qwen3_coder_call("ping")),
    ("hermes", "Plan: " + hermes_call("get_weather", {"city": "Kyiv", "days": 2}) + "\n" + hermes_call("ping", {})),
    ("hermes", "no calls at all, <tool but not a tag"),
])
def test_streamed_deltas_add_up_to_the_non_streamed_message(parser, text):
    whole, _ = parse(text, parser)
    for pieces in splits(text, 7):
        streamed, deltas = parse(text, parser, pieces)
        assert streamed["content"] == whole["content"]
        assert arguments(streamed) == arguments(whole)
        assert [c["function"]["arguments"] for c in streamed.get("tool_calls", [])] == \
               [c["function"]["arguments"] for c in whole.get("tool_calls", [])]
        starts = [c for d in deltas for c in d.get("tool_calls", []) if "id" in c]
        assert [c["index"] for c in starts] == list(range(len(whole.get("tool_calls", []))))
        assert all(c["function"]["arguments"] == "" for c in starts)  # name once, arguments after


def test_reasoning_split_when_the_model_opens_the_block():
    text = "<think>\nThe user wants 2+2.\n</think>\n\nIt is 4."
    whole, _ = parse(text, None, reasoning=QWEN3)
    assert whole["reasoning_content"] == "The user wants 2+2." and whole["content"] == "It is 4."
    for pieces in splits(text, 5):
        assert parse(text, None, pieces, reasoning=QWEN3)[0] == whole


def test_reasoning_split_when_the_prompt_opened_the_block():
    prompt = "<|im_start|>assistant\n<think>\n"
    assert opens_reasoning(prompt, QWEN3)
    assert not opens_reasoning(prompt + "\n</think>\n\n", QWEN3)
    text = "Think hard.\n</think>\n\n" + qwen3_coder_call("ping")
    whole, _ = parse(text, "qwen3_coder", reasoning=QWEN3, inside=True)
    assert whole["reasoning_content"] == "Think hard." and whole["content"] is None
    assert arguments(whole) == [("ping", {})]
    for pieces in splits(text, 9):
        assert arguments(parse(text, "qwen3_coder", pieces, reasoning=QWEN3, inside=True)[0]) == [("ping", {})]
    # without the split, the same text is all content
    assert parse("<think>a</think>b", None)[0]["content"] == "<think>a</think>b"


def test_unfinished_reasoning_is_all_reasoning_and_no_reasoning_is_all_content():
    assert parse("still thinking <", None, reasoning=QWEN3, inside=True)[0] == {
        "role": "assistant", "content": "", "reasoning_content": "still thinking <"}
    plain, _ = parse("Just an answer.", None, reasoning=QWEN3)
    assert plain["content"] == "Just an answer." and plain["reasoning_content"] is None
