"""tool_choice `required` and named functions, enforced by structured output (an EBNF of the calls in the
parser's format, passed as the request's `ebnf`): `tandem serve --pp-size 2 --tool-call-parser qwen3_coder
--reasoning-parser qwen3` on a random checkpoint, which only ever calls a tool because the grammar makes it,
driven with the official `openai` client; the `hermes` format through an in-process app. Every sampled call
names one of the tools and its arguments validate against that tool's schema (the `jsonschema` package);
streamed argument deltas add up to the non-streamed arguments; with the reasoning open in the prompt the
grammar starts after `</think>`.

Needs the structured-output branch (the grammar's enforcement in the sampler)."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from support.agent_chat import agent_checkpoint
from support.server import ServeProcess

EOS = 2  # <|im_end|>
THINK_END = 301  # "</think>" (support/agent_chat.py)
# where the grammar lets the answer end (after a complete call) a random model rarely picks EOS: this bias
# makes it, so that one call is made; it changes no choice the grammar leaves open
END_AFTER_A_CALL = {str(EOS): 100}
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo", "Lima"]},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 7},
                                            "metric": {"type": "boolean"}},
           "required": ["city", "days"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "ping", "parameters": {"type": "object", "properties": {}}}}]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
USER = [{"role": "user", "content": "What is the weather in Paris?"}]
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}


@pytest.fixture(scope="module")
def model_dir(ckpt, tmp_path_factory):
    return agent_checkpoint(ckpt("qwen3_5", with_tokenizer=True), tmp_path_factory.mktemp("tool_choice"))


@pytest.fixture(scope="module")
def client(model_dir, tmp_path_factory):
    flags = ["--pp-size", "2", "--dtype", "float32", "--context-length", "1024", "--tool-call-parser", "qwen3_coder",
             "--reasoning-parser", "qwen3", "--served-model-name", "x"]
    with ServeProcess.running(model_dir, tmp_path_factory.mktemp("tool_choice_server") / "server.log", flags) as srv:
        yield openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=300)


def check_calls(choice, names=None, finished=True) -> list[tuple[str, dict]]:
    """The choice's calls as (name, arguments); each valid against its tool's schema."""
    if finished:
        assert choice.finish_reason == "tool_calls", choice
        assert choice.message.content is None
    calls = []
    for call in choice.message.tool_calls:
        assert call.id.startswith("call_") and call.type == "function"
        name, arguments = call.function.name, json.loads(call.function.arguments)
        assert name in (names or SCHEMAS)
        jsonschema.validate(arguments, SCHEMAS[name])
        calls.append((name, arguments))
    assert calls
    return calls


def test_required_calls_are_valid_for_every_sample(client):
    out = client.chat.completions.create(model="x", messages=USER, tools=TOOLS, tool_choice="required", n=8,
                                         temperature=1.0, seed=7, max_tokens=300, logit_bias=END_AFTER_A_CALL,
                                         extra_body=NO_THINKING)
    assert len(out.choices) == 8
    for choice in out.choices:
        check_calls(choice)


def test_required_parallel_calls_are_all_valid(client):
    # without the EOS bias the random model goes on calling until max_tokens: every finished call is valid,
    # and the one max_tokens cut short stays in the content as written
    out = client.chat.completions.create(model="x", messages=USER, tools=TOOLS, tool_choice="required", n=2,
                                         temperature=1.0, seed=9, max_tokens=120, extra_body=NO_THINKING)
    for choice in out.choices:
        calls = check_calls(choice, finished=choice.finish_reason != "length")
        assert len(calls) >= 1
        if choice.finish_reason == "length":
            head, content = "<tool_call>\n<function=", choice.message.content
            assert content.startswith(head) or head.startswith(content)  # the cut call, as written


def test_a_named_function_and_one_call_only(client):
    named = {"type": "function", "function": {"name": "get_weather"}}
    out = client.chat.completions.create(model="x", messages=USER, tools=TOOLS, tool_choice=named, n=4,
                                         temperature=1.0, seed=3, max_tokens=300, extra_body=NO_THINKING)
    for choice in out.choices:
        assert [name for name, _ in check_calls(choice, ["get_weather"])] == ["get_weather"]
    out = client.chat.completions.create(model="x", messages=USER, tools=TOOLS, tool_choice="required", n=4,
                                         parallel_tool_calls=False, temperature=1.0, seed=5, max_tokens=300,
                                         extra_body=NO_THINKING)
    for choice in out.choices:
        assert len(check_calls(choice)) == 1


def test_streamed_argument_deltas_equal_the_non_streamed_arguments(client):
    kwargs = dict(model="x", messages=USER, tools=TOOLS, tool_choice="required", temperature=0, max_tokens=300,
                  logit_bias=END_AFTER_A_CALL, extra_body=NO_THINKING)
    whole = client.chat.completions.create(**kwargs).choices[0]
    expected = check_calls(whole)
    calls: dict[int, dict] = {}
    reasons = []
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            assert not choice.delta.content
            for call in choice.delta.tool_calls or []:
                if call.id is not None:  # the first delta of a call: its id and name, once
                    assert call.index not in calls and call.function.name
                    calls[call.index] = {"name": call.function.name, "arguments": call.function.arguments or ""}
                else:
                    assert call.function.name is None
                    calls[call.index]["arguments"] += call.function.arguments
            if choice.finish_reason:
                reasons.append(choice.finish_reason)
    assert reasons == ["tool_calls"]
    assert [(calls[i]["name"], calls[i]["arguments"]) for i in sorted(calls)] == \
           [(c.function.name, c.function.arguments) for c in whole.message.tool_calls]
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == expected


def test_the_grammar_starts_after_the_reasoning(client):
    # the template opens <think>: the grammar waits for </think>, which the bias makes the first token
    out = client.chat.completions.create(model="x", messages=USER, tools=TOOLS, tool_choice="required",
                                         temperature=0, max_tokens=300, parallel_tool_calls=False,
                                         logit_bias={str(THINK_END): 100})
    choice = out.choices[0]
    check_calls(choice)
    assert choice.message.model_extra["reasoning_content"] is None


def test_hermes_required_calls(model_dir):
    from fastapi.testclient import TestClient

    from tandem import Engine
    from tandem.server import create_app
    from tandem.server.chat_prompt import ChatSettings

    engine = Engine(str(model_dir), dtype="float32", device="cpu", context_length=1024)
    app = create_app(engine, served_model_name="x", chat=ChatSettings(tool_call_parser="hermes"))
    with TestClient(app) as http:
        client = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=http, max_retries=0)
        out = client.chat.completions.create(model="x", messages=USER, tools=TOOLS, tool_choice="required", n=4,
                                             temperature=1.0, seed=11, max_tokens=300, logit_bias=END_AFTER_A_CALL,
                                             extra_body=NO_THINKING)
        for choice in out.choices:
            check_calls(choice)
