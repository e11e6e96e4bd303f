"""Agent serving through `tandem serve --pp-size 2 --tool-call-parser qwen3_coder --reasoning-parser qwen3
--chat-template FILE` (the Qwen3.5 recipe) on a random checkpoint whose tokenizer has Qwen's `<think>` /
`<tool_call>` tokens, driven with the official `openai` client: tools, earlier tool calls and
chat_template_kwargs reach the template (prompt tokens equal transformers' rendering); the reasoning split,
streamed and not, against the raw text of the same tokens from /v1/completions; unparsable call markup
left as content; 400s that name the field, after which the server keeps serving; SGLang's other endpoints
and metric names. The required / named tool_choice tests are tests/test_server_tool_choice.py."""

from __future__ import annotations

import json
import re

import httpx
import openai
import pytest

from support.agent_chat import QWEN35_STYLE_TEMPLATE, agent_checkpoint
from support.server import ServeProcess

THINK_END = 301  # "</think>" (support/agent_chat.py)
TOOL_CALL = 302  # "<tool_call>"
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city.",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]
USER = [{"role": "user", "content": "What is the weather in Paris?"}]
HISTORY = USER + [
    {"role": "assistant", "content": "", "tool_calls": [{"id": "call_1", "type": "function", "function": {
        "name": "get_weather", "arguments": json.dumps({"city": "Paris"})}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}]
# what the template receives: the call's arguments as the object their JSON text encodes
HISTORY_RENDERED = HISTORY[:1] + [{**HISTORY[1], "tool_calls": [{**HISTORY[1]["tool_calls"][0], "function": {
    "name": "get_weather", "arguments": {"city": "Paris"}}}]}] + HISTORY[2:]


@pytest.fixture(scope="module")
def model_dir(ckpt, tmp_path_factory):
    # the tokenizer keeps its plain ChatML template: tools render only through --chat-template
    return agent_checkpoint(ckpt("qwen3_5", with_tokenizer=True), tmp_path_factory.mktemp("agent"), chat_template=None)


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    logs = tmp_path_factory.mktemp("agent_server")
    template = logs / "qwen35.jinja"
    template.write_text(QWEN35_STYLE_TEMPLATE)
    flags = ["--pp-size", "2", "--dtype", "float32", "--context-length", "1024", "--tool-call-parser", "qwen3_coder",
             "--reasoning-parser", "qwen3", "--chat-template", str(template), "--enable-metrics",
             "--served-model-name", "agent"]
    with ServeProcess.running(model_dir, logs / "server.log", flags) as srv:
        yield srv


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)


def hf_prompt(tokenizer, messages, **kwargs) -> list[int]:
    text = tokenizer.apply_chat_template(messages, chat_template=QWEN35_STYLE_TEMPLATE, tokenize=False,
                                         add_generation_prompt=True, **kwargs)
    return tokenizer.encode(text, add_special_tokens=False)


def raw_text(client, prompt_ids, max_tokens, **extra) -> str:
    """The greedy continuation's text, unparsed (the independent reference of the splits)."""
    return client.completions.create(model="agent", prompt=prompt_ids, max_tokens=max_tokens, temperature=0,
                                     extra_body={"ignore_eos": True, **extra}).choices[0].text


def chat(client, messages, stream=False, **kwargs):
    kwargs.setdefault("max_tokens", 8)
    extra = {"ignore_eos": True, **kwargs.pop("extra_body", {})}
    return client.chat.completions.create(model="agent", messages=messages, temperature=0, stream=stream,
                                          extra_body=extra, **kwargs)


def streamed(client, messages, **kwargs) -> dict:
    reasoning, content, reasons = [], [], []
    for chunk in chat(client, messages, stream=True, **kwargs):
        for choice in chunk.choices:
            delta = choice.delta
            reasoning.append((delta.model_extra or {}).get("reasoning_content") or "")
            content.append(delta.content or "")
            assert not delta.tool_calls
            if choice.finish_reason:
                reasons.append(choice.finish_reason)
    return {"reasoning": "".join(reasoning) or None, "content": "".join(content), "finish": reasons}


def test_tools_history_and_template_kwargs_reach_the_template(client, tokenizer):
    cases = ((USER, USER, {}), (HISTORY, HISTORY_RENDERED, {}), (USER, USER, {"enable_thinking": False}))
    for messages, rendered, kwargs in cases:
        out = chat(client, messages, max_tokens=1, tools=TOOLS,
                   extra_body={"chat_template_kwargs": kwargs} if kwargs else {})
        assert out.usage.prompt_tokens == len(hf_prompt(tokenizer, rendered, tools=TOOLS, **kwargs)), kwargs
    # without tools the template writes no tool list: fewer tokens
    assert chat(client, USER, max_tokens=1).usage.prompt_tokens == len(hf_prompt(tokenizer, USER))
    assert len(hf_prompt(tokenizer, USER)) < len(hf_prompt(tokenizer, USER, tools=TOOLS))


def test_reasoning_split_when_the_template_opened_think(client, tokenizer):
    prompt = hf_prompt(tokenizer, USER)  # ends with "<think>\n": the answer starts inside the reasoning
    raw = raw_text(client, prompt, 8)
    head, sep, tail = raw.partition("</think>")
    want = (head.strip() or None, tail.lstrip()) if sep else (raw.strip() or None, "")
    out = chat(client, USER).choices[0]
    assert (out.message.model_extra["reasoning_content"], out.message.content) == want
    assert streamed(client, USER) == {"reasoning": want[0], "content": want[1], "finish": ["length"]}
    # the first </think> ends the reasoning: force it at every step
    forced = raw_text(client, prompt, 4, logit_bias={str(THINK_END): 100})
    assert forced == "</think>" * 4
    out = chat(client, USER, max_tokens=4, logit_bias={str(THINK_END): 100}).choices[0]
    assert (out.message.model_extra["reasoning_content"], out.message.content) == (None, "</think>" * 3)
    assert streamed(client, USER, max_tokens=4, logit_bias={str(THINK_END): 100})["content"] == "</think>" * 3
    # separate_reasoning false: the raw text is the content
    out = chat(client, USER, extra_body={"separate_reasoning": False}).choices[0]
    assert out.message.content == raw and "reasoning_content" not in (out.message.model_extra or {})


def test_no_reasoning_when_thinking_is_off(client, tokenizer):
    kwargs = {"chat_template_kwargs": {"enable_thinking": False}}
    raw = raw_text(client, hf_prompt(tokenizer, USER, enable_thinking=False), 8)
    out = chat(client, USER, extra_body=kwargs).choices[0]
    assert out.message.model_extra["reasoning_content"] is None and out.message.content == raw.lstrip()
    assert streamed(client, USER, extra_body=kwargs)["content"] == raw.lstrip()


def test_unfinished_call_markup_is_left_as_content(client, tokenizer):
    kwargs = {"chat_template_kwargs": {"enable_thinking": False}}
    out = chat(client, USER, max_tokens=3, tools=TOOLS, logit_bias={str(TOOL_CALL): 100}, extra_body=kwargs)
    choice = out.choices[0]
    assert choice.message.content == "<tool_call>" * 3 and not choice.message.tool_calls
    assert choice.finish_reason == "length"
    got = streamed(client, USER, max_tokens=3, tools=TOOLS, logit_bias={str(TOOL_CALL): 100}, extra_body=kwargs)
    assert got["content"] == "<tool_call>" * 3


@pytest.mark.parametrize("body, param", [
    ({"tools": [{"type": "function"}]}, "tools.0.function"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools.0.function.name"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"foo": {"bar": 1}}, "foo"),
    ({"stream_options": {"include_usage": True, "continuous_usage_stats": True}}, "stream_options.continuous_usage_stats"),
    ({"messages": [{"role": "user", "content": "hi", "audio": {"id": "x"}}]}, "messages.0.audio"),
    ({"stream_reasoning": False}, "stream_reasoning"),
    ({"chat_template_kwargs": {"tools": []}}, "chat_template_kwargs"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}]},
                   {"role": "user", "content": "hi"}]}, "messages.0.tool_calls.0.function"),
])
def test_bad_tool_fields_are_400s_naming_the_field_and_the_server_keeps_serving(server, body, param):
    request = {"model": "agent", "messages": USER, "max_tokens": 1, **body}
    resp = httpx.post(server.url + "/v1/chat/completions", json=request, timeout=60)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == param
    ok = httpx.post(server.url + "/v1/chat/completions", json={"messages": USER, "max_tokens": 1, "user": "u1"},
                    timeout=60)
    assert ok.status_code == 200  # `user` is accepted and ignored on purpose


def test_unknown_generate_and_completion_fields_are_400s(server):
    resp = httpx.post(server.url + "/generate", json={"text": "hi", "lora_path": "x"}, timeout=60)
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "lora_path"
    resp = httpx.post(server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 1,
                                                                 "return_hidden_states": True}, timeout=60)
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "return_hidden_states"


def test_tokenize_detokenize_and_models(server, tokenizer):
    text = "The cat sees a red ball <think>"
    resp = httpx.post(server.url + "/tokenize", json={"prompt": text}).json()
    assert resp == {"tokens": tokenizer.encode(text), "count": len(tokenizer.encode(text)), "max_model_len": 1024}
    batch = httpx.post(server.url + "/tokenize", json={"prompt": [text, "hi"], "add_special_tokens": False}).json()
    assert batch["tokens"] == [tokenizer.encode(t, add_special_tokens=False) for t in (text, "hi")]
    ids = tokenizer.encode(text) + [2]
    assert httpx.post(server.url + "/detokenize", json={"tokens": ids}).json() == {
        "text": tokenizer.decode(ids, skip_special_tokens=True)}
    assert httpx.post(server.url + "/detokenize", json={"tokens": [ids], "skip_special_tokens": False}).json() == {
        "text": [tokenizer.decode(ids)]}
    assert httpx.post(server.url + "/detokenize", json={"tokens": [10 ** 6]}).status_code == 400
    card = httpx.get(server.url + "/v1/models/agent").json()
    assert card["id"] == "agent" and card["object"] == "model" and card["max_model_len"] == 1024
    assert httpx.get(server.url + "/v1/models/other").status_code == 404


def test_server_info_health_generate_version(server):
    info = httpx.get(server.url + "/get_server_info").json()
    assert info["tool_call_parser"] == "qwen3_coder" and info["reasoning_parser"] == "qwen3"
    assert info["pp_size"] == 2 and info["served_model_name"] == "agent" and info["api_key"] is False
    assert info["version"] == httpx.get(server.url + "/version").json()["version"] != "unknown"
    assert info["internal_states"][0]["max_running_requests"] >= 1
    assert httpx.get(server.url + "/health_generate").json() == {"status": "ok"}


def test_flush_cache_empties_the_prefix_cache(server, client):
    prompt = "The cat sees a red ball today. " * 6
    first = client.completions.create(model="agent", prompt=prompt, max_tokens=1)
    again = client.completions.create(model="agent", prompt=prompt, max_tokens=1)
    assert again.usage.prompt_tokens_details.cached_tokens > 0 == first.usage.prompt_tokens_details.cached_tokens
    resp = httpx.post(server.url + "/flush_cache")
    assert resp.status_code == 200
    after = client.completions.create(model="agent", prompt=prompt, max_tokens=1)
    assert after.usage.prompt_tokens_details.cached_tokens == 0
    assert httpx.get(server.url + "/flush_cache").status_code == 200


def _metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE)
    assert match, name
    return float(match.group(1))


def test_sglang_metric_names(server, client):
    names = ["sglang:prompt_tokens_total", "sglang:generation_tokens_total", "sglang:num_requests_total",
             "sglang:time_to_first_token_seconds_count", "sglang:e2e_request_latency_seconds_count"]
    before = httpx.get(server.url + "/metrics").text
    out = client.completions.create(model="agent", prompt="12+34=", max_tokens=5, extra_body={"ignore_eos": True})
    after = httpx.get(server.url + "/metrics").text
    delta = {n: _metric(after, n) - _metric(before, n) for n in names}
    assert delta == {"sglang:prompt_tokens_total": out.usage.prompt_tokens, "sglang:generation_tokens_total": 5,
                     "sglang:num_requests_total": 1, "sglang:time_to_first_token_seconds_count": 1,
                     "sglang:e2e_request_latency_seconds_count": 1}
    assert 'sglang:prompt_tokens_total{model_name="agent"}' in after
    for gauge in ("sglang:num_running_reqs", "sglang:num_queue_reqs", "sglang:token_usage", "sglang:cache_hit_rate",
                  "sglang:num_used_tokens", "sglang:max_total_num_tokens"):
        assert _metric(after, gauge) >= 0, gauge
    assert _metric(after, "sglang:num_running_reqs") == 0 and _metric(after, "sglang:max_total_num_tokens") > 0


@pytest.mark.parametrize("flags, named", [(["--tool-call-parser", "nope"], "--tool-call-parser"),
                                          (["--reasoning-parser", "deepseek_r1"], "--reasoning-parser"),
                                          (["--chat-template", "/no/such/file.jinja"], "--chat-template")])
def test_bad_chat_flags_stop_the_start(tmp_path, capsys, flags, named):
    from tandem.cli import main

    try:  # argparse exits with 2 on a bad choice; a ConfigError before the engine starts returns 2
        code = main(["serve", "--model-path", str(tmp_path), *flags])
    except SystemExit as exc:
        code = exc.code
    assert code == 2 and named in capsys.readouterr().err
