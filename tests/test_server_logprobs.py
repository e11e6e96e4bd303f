"""Logprobs and the sampling options of the OpenAI endpoints, through the official `openai` client against a
live `tandem serve` (pp=2, fp32) on a checkpoint with every weight randomized, each checked against a direct
computation on transformers' logits of the same tokens:

- completions `echo` + `logprobs` (prompt tokens first, the first with None; top-N dicts plus the chosen
  token; text offsets), `max_tokens: 0` scoring, every prompt form, streaming;
- chat `logprobs` + `top_logprobs` (token, logprob, bytes, alternatives), streaming;
- presence/frequency penalties, repetition_penalty and logit_bias: greedy decoding on transformers' logits
  with the adjustment applied by hand;
- n (choice j of a seeded request draws with seed + j; its logprobs are transformers' for its tokens) and
  best_of (the n completions with the highest cumulative logprob);
- what is still out of range or unsupported is a 400 naming the field."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
import torch

from support.logits import FORCED, HF, bias, forcing_bias, presence_frequency, repetition
from support.server import ServeProcess

CONTEXT = 512
PROMPT = "The cat sees a red ball"
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
NEW_TOKENS = 6
TOL = 1e-4


@pytest.fixture(scope="module")
def model_dir(ckpt):
    return ckpt("qwen3_5_moe", with_tokenizer=True)


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    flags = ["--pp-size", "2", "--dtype", "float32", "--context-length", str(CONTEXT)]
    with ServeProcess.running(model_dir, tmp_path_factory.mktemp("server_logprobs") / "server.log", flags) as srv:
        yield srv


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model_name(client):
    return client.models.list().data[0].id


@pytest.fixture(scope="module")
def hf(model_dir, tokenizer):
    return HF(model_dir, tokenizer)


def chat_ids(tokenizer, messages) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"])


def assert_dicts_close(got: dict, expected: dict) -> None:
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=TOL), key


def check_completion_logprobs(hf, logprobs, ids: list[int], num_prompt: int, top_n: int) -> None:
    """`logprobs` (a completions logprobs object) describes tokens `ids`, of which the first `num_prompt` are
    an echoed prompt, with transformers' logprobs."""
    ref = hf.logprobs(ids)
    assert logprobs.tokens == [hf.text(t) for t in ids]
    offsets = [0]
    for token in logprobs.tokens[:-1]:
        offsets.append(offsets[-1] + len(token))
    assert logprobs.text_offset == offsets
    first = 0
    if num_prompt:
        assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
        first = 1
    for k in range(first, len(ids)):
        row = ref[k - 1]
        assert logprobs.token_logprobs[k] == pytest.approx(float(row[ids[k]]), abs=TOL)
        assert_dicts_close(logprobs.top_logprobs[k], hf.top_dict(row, ids[k], top_n))


def test_completion_echo_logprobs_match_transformers(client, model_name, hf, tokenizer):
    prompt_ids = tokenizer.encode(PROMPT)
    out_ids = hf.greedy(prompt_ids, NEW_TOKENS)
    out = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=NEW_TOKENS, temperature=0, echo=True,
                                    logprobs=3, extra_body={"ignore_eos": True})
    choice = out.choices[0]
    assert choice.text == PROMPT + tokenizer.decode(out_ids, skip_special_tokens=True)
    check_completion_logprobs(hf, choice.logprobs, prompt_ids + out_ids, len(prompt_ids), 3)
    # without echo: the generated tokens only
    out = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=NEW_TOKENS, temperature=0, logprobs=2,
                                    extra_body={"ignore_eos": True})
    logprobs = out.choices[0].logprobs
    ref = hf.logprobs(prompt_ids + out_ids)
    assert logprobs.tokens == [hf.text(t) for t in out_ids]
    for k, t in enumerate(out_ids):
        row = ref[len(prompt_ids) - 1 + k]
        assert logprobs.token_logprobs[k] == pytest.approx(float(row[t]), abs=TOL)
        assert_dicts_close(logprobs.top_logprobs[k], hf.top_dict(row, t, 2))
    # max_tokens 0 with echo scores the prompt without generating
    out = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=0, echo=True, logprobs=1)
    assert out.choices[0].text == PROMPT and out.usage.completion_tokens == 0
    assert out.choices[0].finish_reason == "length"
    check_completion_logprobs(hf, out.choices[0].logprobs, prompt_ids, len(prompt_ids), 1)


def test_completion_logprobs_of_every_prompt_form(client, model_name, hf, tokenizer):
    texts = [PROMPT, "12+34="]
    ids = [tokenizer.encode(t) for t in texts]
    for prompt in (texts, ids, ids[1]):
        out = client.completions.create(model=model_name, prompt=prompt, max_tokens=0, echo=True, logprobs=2)
        expected = ids if isinstance(prompt[0], (str, list)) else [ids[1]]
        assert [c.index for c in out.choices] == list(range(len(expected)))
        for choice, prompt_ids in zip(out.choices, expected):
            check_completion_logprobs(hf, choice.logprobs, prompt_ids, len(prompt_ids), 2)


def test_streamed_completion_logprobs_equal_non_streamed(client, model_name):
    kwargs = dict(model=model_name, prompt=[PROMPT, "12+34="], max_tokens=NEW_TOKENS, temperature=0, echo=True,
                  logprobs=2, extra_body={"ignore_eos": True})
    whole = client.completions.create(**kwargs)
    chunks = list(client.completions.create(stream=True, **kwargs))
    for choice in whole.choices:
        parts = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == choice.index]
        assert "".join(p.text for p in parts) == choice.text
        streamed = [p.logprobs for p in parts if p.logprobs is not None]
        assert sum((p.tokens for p in streamed), []) == choice.logprobs.tokens
        assert sum((p.text_offset for p in streamed), []) == choice.logprobs.text_offset
        assert sum((p.token_logprobs for p in streamed), []) == choice.logprobs.token_logprobs
        assert sum((p.top_logprobs for p in streamed), []) == choice.logprobs.top_logprobs


def check_chat_content(hf, content, ids: list[int], num_prompt: int, top_n: int) -> None:
    ref = hf.logprobs(ids)
    generated = ids[num_prompt:]
    assert [c.token for c in content] == [hf.text(t) for t in generated]
    for k, (item, t) in enumerate(zip(content, generated)):
        row = ref[num_prompt - 1 + k]
        assert item.logprob == pytest.approx(float(row[t]), abs=TOL)
        assert item.bytes == list(item.token.encode("utf-8"))
        top = torch.topk(row, top_n)
        assert [alt.token for alt in item.top_logprobs] == [hf.text(i) for i in top.indices.tolist()]
        assert [alt.logprob for alt in item.top_logprobs] == pytest.approx(top.values.tolist(), abs=TOL)
        assert all(alt.bytes == list(alt.token.encode("utf-8")) for alt in item.top_logprobs)


def test_chat_top_logprobs_match_transformers_and_stream(client, model_name, hf, tokenizer):
    prompt_ids = chat_ids(tokenizer, CHAT)
    out_ids = hf.greedy(prompt_ids, NEW_TOKENS)
    kwargs = dict(model=model_name, messages=CHAT, max_tokens=NEW_TOKENS, temperature=0, logprobs=True,
                  top_logprobs=4, extra_body={"ignore_eos": True})
    out = client.chat.completions.create(**kwargs)
    check_chat_content(hf, out.choices[0].logprobs.content, prompt_ids + out_ids, len(prompt_ids), 4)
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    streamed = sum((c.choices[0].logprobs.content for c in chunks if c.choices and c.choices[0].logprobs), [])
    check_chat_content(hf, streamed, prompt_ids + out_ids, len(prompt_ids), 4)
    # logprobs without top_logprobs: no alternatives
    out = client.chat.completions.create(model=model_name, messages=CHAT, max_tokens=2, temperature=0, logprobs=True)
    assert [c.top_logprobs for c in out.choices[0].logprobs.content] == [[], []]


# ---- penalties and logit_bias ------------------------------------------------------------------------

def completion_tokens(client, model_name, prompt: list[int], **kwargs) -> list[str]:
    extra = kwargs.pop("extra_body", {})
    out = client.completions.create(model=model_name, prompt=prompt, max_tokens=8, temperature=0, logprobs=0,
                                    extra_body={"ignore_eos": True, **extra}, **kwargs)
    return out.choices[0].logprobs.tokens


def test_penalties_and_logit_bias_match_hand_computation(client, model_name, hf, tokenizer):
    prompt = tokenizer.encode(PROMPT)
    plain = hf.greedy(prompt, 8)
    forced = {FORCED: forcing_bias(hf, prompt, FORCED, 8)}
    repeated = hf.greedy(prompt, 8, bias(forced))
    assert repeated == [FORCED] * 8
    runner_up = int(torch.topk(hf.logits(prompt)[-1], 3).indices[2])
    with_bias = lambda adjust: lambda row, generated: adjust(bias(forced)(row, generated), generated)
    json_bias = {str(t): b for t, b in forced.items()}
    cases = [  # (request options, the adjustment by hand, the output the option must change)
        (dict(logit_bias=json_bias), bias(forced), plain),
        (dict(logit_bias={str(plain[0]): -100, str(runner_up): 4.0}), bias({plain[0]: -100.0, runner_up: 4.0}),
         plain),
        (dict(logit_bias=json_bias, frequency_penalty=2.0), with_bias(presence_frequency(0.0, 2.0)), repeated),
        (dict(logit_bias=json_bias, presence_penalty=1.5), with_bias(presence_frequency(1.5, 0.0)), repeated),
        (dict(logit_bias=json_bias, presence_penalty=0.5, frequency_penalty=0.75),
         with_bias(presence_frequency(0.5, 0.75)), repeated),
        (dict(extra_body={"repetition_penalty": 1.8}), repetition(1.8, prompt), plain),
    ]
    for options, adjust, unchanged in cases:
        expected = hf.greedy(prompt, 8, adjust)
        assert expected != unchanged, f"{options} does not change this greedy continuation"
        assert completion_tokens(client, model_name, prompt, **dict(options)) == [hf.text(t) for t in expected], \
            options


def test_engine_api_takes_the_same_names(server, hf, tokenizer):
    """/generate passes raw engine sampling_params: the same names reach the same sampler, applied in order
    repetition_penalty, frequency and presence penalties, logit_bias."""
    prompt = tokenizer.encode(PROMPT)
    forced = {FORCED: forcing_bias(hf, prompt, FORCED, 8)}
    params = {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True, "frequency_penalty": 1.0,
              "presence_penalty": 0.5, "repetition_penalty": 1.3, "logit_bias": {str(FORCED): forced[FORCED]}}

    def adjust(row, generated):
        row = repetition(1.3, prompt)(row, generated)
        return bias(forced)(presence_frequency(0.5, 1.0)(row, generated), generated)

    expected = hf.greedy(prompt, 8, adjust)
    assert expected not in (hf.greedy(prompt, 8), hf.greedy(prompt, 8, bias(forced)))
    out = httpx.post(server.url + "/generate", json={"input_ids": prompt, "sampling_params": params}, timeout=60)
    assert out.status_code == 200, out.text
    assert out.json()["output_ids"] == expected


# ---- n and best_of ----------------------------------------------------------------------------------------

def test_n_choices_are_seeded_requests_with_transformers_logprobs(client, model_name, server, hf, tokenizer):
    prompt = tokenizer.encode(PROMPT)
    sampling = {"temperature": 1.0, "max_new_tokens": NEW_TOKENS, "ignore_eos": True, "seed": 11}
    native = httpx.post(server.url + "/generate", json={"input_ids": prompt, "sampling_params": {**sampling, "n": 3},
                                                        "return_logprob": True}, timeout=60).json()
    assert isinstance(native, list) and len(native) == 3
    singles = [httpx.post(server.url + "/generate", timeout=60,
                          json={"input_ids": prompt, "sampling_params": {**sampling, "seed": 11 + j}}).json()
               for j in range(3)]
    assert [r["output_ids"] for r in native] == [r["output_ids"] for r in singles]
    assert len({tuple(r["output_ids"]) for r in native}) > 1, "three draws at temperature 1 should not all agree"
    cumulative = []
    for r in native:
        ref = hf.logprobs(prompt + r["output_ids"])
        expected = [float(ref[len(prompt) - 1 + k, t]) for k, t in enumerate(r["output_ids"])]
        got = [lp for lp, _ in r["meta_info"]["output_token_logprobs"]]
        assert got == pytest.approx(expected, abs=TOL)
        cumulative.append(sum(expected))
    # the OpenAI endpoint: n=3 answers the same three completions, best_of the best n by cumulative logprob
    texts = [tokenizer.decode(r["output_ids"], skip_special_tokens=True) for r in native]
    kwargs = dict(model=model_name, prompt=prompt, max_tokens=NEW_TOKENS, temperature=1.0, seed=11,
                  extra_body={"ignore_eos": True})
    out = client.completions.create(n=3, **kwargs)
    assert [c.index for c in out.choices] == [0, 1, 2] and [c.text for c in out.choices] == texts
    ranked = sorted(range(3), key=lambda j: -cumulative[j])
    out = client.completions.create(n=1, best_of=3, **kwargs)
    assert [c.text for c in out.choices] == [texts[ranked[0]]]
    assert out.usage.completion_tokens == 3 * NEW_TOKENS  # every completion drawn is counted
    out = client.completions.create(n=2, best_of=3, **kwargs)
    assert [c.text for c in out.choices] == [texts[j] for j in ranked[:2]] and [c.index for c in out.choices] == [0, 1]


def test_chat_n_greedy_choices_all_equal_transformers(client, model_name, hf, tokenizer):
    prompt_ids = chat_ids(tokenizer, CHAT)
    text = tokenizer.decode(hf.greedy(prompt_ids, NEW_TOKENS), skip_special_tokens=True)
    out = client.chat.completions.create(model=model_name, messages=CHAT, max_tokens=NEW_TOKENS, temperature=0, n=2,
                                         extra_body={"ignore_eos": True})
    assert [(c.index, c.message.content) for c in out.choices] == [(0, text), (1, text)]
    chunks = list(client.chat.completions.create(model=model_name, messages=CHAT, max_tokens=NEW_TOKENS,
                                                 temperature=0, n=2, stream=True, extra_body={"ignore_eos": True}))
    for index in (0, 1):
        parts = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == index]
        assert parts[0].delta.role == "assistant"
        assert "".join(p.delta.content or "" for p in parts) == text


BAD = [
    ("/v1/completions", {"prompt": "Hello", "n": 0}, "n"),
    ("/v1/completions", {"prompt": "Hello", "n": 129}, "n"),
    ("/v1/completions", {"prompt": "Hello", "n": 3, "best_of": 2}, "best_of"),
    ("/v1/completions", {"prompt": "Hello", "best_of": 2, "stream": True}, "best_of"),
    ("/v1/completions", {"prompt": "Hello", "logprobs": 6}, "logprobs"),
    ("/v1/completions", {"prompt": "Hello", "logprobs": -1}, "logprobs"),
    ("/v1/completions", {"prompt": "Hello", "presence_penalty": 2.5}, "presence_penalty"),
    ("/v1/completions", {"prompt": "Hello", "frequency_penalty": -3}, "frequency_penalty"),
    ("/v1/completions", {"prompt": "Hello", "repetition_penalty": 0}, "repetition_penalty"),
    ("/v1/completions", {"prompt": "Hello", "logit_bias": {"100000": 1}}, "logit_bias"),
    ("/v1/completions", {"prompt": "Hello", "logit_bias": {"5": 101}}, "logit_bias"),
    ("/v1/completions", {"prompt": "Hello", "logit_bias": {"x": 1}}, "logit_bias"),
    ("/v1/completions", {"prompt": "Hello", "suffix": "!"}, "suffix"),
    ("/v1/chat/completions", {"messages": CHAT, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": CHAT, "top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": CHAT, "n": 0}, "n"),
    ("/generate", {"text": "Hello", "sampling_params": {"n": 0}}, "sampling_params.n"),
    ("/generate", {"text": "Hello", "sampling_params": {"logit_bias": {"100000": 1.0}}}, "sampling_params.logit_bias"),
]


@pytest.mark.parametrize("path,body,param", BAD, ids=[f"{i}-{b[2]}" for i, b in enumerate(BAD)])
def test_out_of_range_options_are_400(server, path, body, param):
    resp = httpx.post(server.url + path, content=json.dumps(body), headers={"content-type": "application/json"},
                      timeout=60)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]
