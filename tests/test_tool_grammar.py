"""The EBNF that enforces tool_choice `required` / named, checked with xgrammar itself: calls in the
parser's format that respect each tool's schema are accepted whole; a wrong name, a missing required
argument, a value of the wrong type, free whitespace, or a second call where one is allowed are not. Every
accepted string also parses back into the expected call (the grammar and the parser agree)."""

from __future__ import annotations

import functools
import json

import jsonschema
import pytest
import xgrammar as xgr

from tandem.server.chat_output import ChoiceOutput, message_of
from tandem.server.tools.grammar import tool_call_ebnf
from tandem.server.tools.spec import check_tools

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"},
                                            "unit": {"type": "string", "enum": ["c", "f"]}},
           "required": ["city"]}
TOOLS = check_tools([{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
                     {"type": "function", "function": {"name": "ping"}}])
CHARS = [chr(i) for i in range(32, 127)] + ["\n"]


@functools.cache
def compiled(ebnf: str):
    return xgr.GrammarCompiler(xgr.TokenizerInfo(CHARS)).compile_grammar(xgr.Grammar.from_ebnf(ebnf))


def accepts(ebnf: str, text: str) -> bool:
    matcher = xgr.GrammarMatcher(compiled(ebnf))
    return matcher.accept_string(text) and matcher.is_completed()


def q(name, **params):
    body = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in params.items())
    return f"<tool_call>\n<function={name}>\n{body}</function>\n</tool_call>"


def h(name, arguments):
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": arguments}) + "\n</tool_call>"


GOOD = {"qwen3_coder": [q("get_weather", city="Paris"), q("get_weather", city="Paris", days="3", unit="f"),
                        q("get_weather", city="a < b"), q("ping")],
        "hermes": [h("get_weather", {"city": "Paris"}), h("get_weather", {"city": "Oslo", "days": 2, "unit": "c"}),
                   h("ping", {})]}
BAD = {"qwen3_coder": [q("get_wether", city="Paris"), q("get_weather", days="3"), q("get_weather", city="x", days="3.5"),
                       q("get_weather", city="x", unit="k"), q("get_weather", city="</parameter>"),
                       "I will call " + q("ping"), q("ping") + "\n"],
       "hermes": [h("get_wether", {"city": "Paris"}), h("get_weather", {"days": 2}),
                  h("get_weather", {"city": "x", "days": "2"}), h("get_weather", {"city": "x", "extra": 1}),
                  h("ping", {}).replace('{"name"', '{ "name"'), "text " + h("ping", {})]}


@pytest.mark.parametrize("parser", ["qwen3_coder", "hermes"])
def test_required_accepts_valid_calls_and_refuses_the_rest(parser):
    one = tool_call_ebnf(parser, TOOLS, parallel=False)
    many = tool_call_ebnf(parser, TOOLS, parallel=True)
    for text in GOOD[parser]:
        assert accepts(one, text), text
        assert accepts(many, text), text
        out = ChoiceOutput(tool_parser=parser, tools={t.name: t for t in TOOLS})
        message = message_of(out.feed(text) + out.finish(), reasoning=False)
        call = message["tool_calls"][0]["function"]
        schema = {t.name: t.parameters for t in TOOLS}[call["name"]]
        jsonschema.validate(json.loads(call["arguments"]), schema)
    for text in BAD[parser]:
        assert not accepts(one, text), text
        assert not accepts(many, text), text
    two = GOOD[parser][0] + "\n" + GOOD[parser][-1]
    assert accepts(many, two) and not accepts(one, two)


@pytest.mark.parametrize("parser", ["qwen3_coder", "hermes"])
def test_a_named_function_allows_that_function_only(parser):
    named = tool_call_ebnf(parser, [TOOLS[1]], parallel=False)
    assert accepts(named, GOOD[parser][-1])
    assert not accepts(named, GOOD[parser][0])
