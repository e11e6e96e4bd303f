"""`tandem serve` end to end: one live server (a subprocess, pp=2, fp32) driven with the official `openai`
client and raw HTTP. Greedy outputs equal transformers' greedy continuation of the same tokens; streamed
text equals non-streamed text; 16 concurrent requests equal their single-request results; bad input gets
OpenAI-style 400s and the server keeps serving; SIGTERM stops the server and both rank processes.

The tests share one server process to keep the module fast. Each test passes alone and in any order: a
test that stops the server (SIGTERM) leaves the next test a fresh one, and no test relies on what another
one did (counters are compared before and after)."""

from __future__ import annotations

import asyncio
import itertools
import json
import signal
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from support.processes import rank_processes
from support.server import ServerPool, served_checkpoint

CONTEXT = 512
EOS = 2  # <|im_end|> of the test tokenizer (tests/support/tokenizer.py)
PROMPTS = ["Hello, world!", "The cat sees a red ball", "12+34=", "How are you?"]
REF_TOKENS = 12
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]


def alive(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return b"tandem.executors.rank" in cmdline and state != "Z"


@pytest.fixture(scope="module")
def model_dir(request, tmp_path_factory):
    return served_checkpoint(request, tmp_path_factory)


SERVE_FLAGS = ["--pp-size", "2", "--dtype", "float32", "--context-length", str(CONTEXT)]


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def chat_ids(tokenizer, messages) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"])


class Reference:
    """transformers' greedy continuation (EOS ignored) of the test prompts and of the chat prompt."""

    def __init__(self, model_dir, tokenizer):
        from support.reference import hf_greedy

        self.tokenizer = tokenizer
        self.prompt_ids = {p: tokenizer.encode(p) for p in PROMPTS[:2]}
        self.prompt_ids["chat"] = chat_ids(tokenizer, CHAT)
        self.greedy = {key: hf_greedy(model_dir, [ids], REF_TOKENS)[0] for key, ids in self.prompt_ids.items()}

    def expected(self, key: str) -> tuple[list[int], str, str]:
        """Greedy output cut after EOS: (ids, text, finish_reason)."""
        ids, reason = self.greedy[key]["output_ids"], "length"
        if EOS in ids:
            ids, reason = ids[: ids.index(EOS) + 1], "stop"
        return ids, self.tokenizer.decode(ids, skip_special_tokens=True), reason


@pytest.fixture(scope="module")
def servers(model_dir, tmp_path_factory):
    pool = ServerPool(model_dir, tmp_path_factory.mktemp("server"), "server", SERVE_FLAGS)
    pool.start()  # loads while the reference is computed
    try:
        yield pool
    finally:
        pool.stop()


@pytest.fixture(scope="module")
def reference(servers, model_dir, tokenizer):  # after `servers`: computed while the first server loads
    return Reference(model_dir, tokenizer)


@pytest.fixture
def server(servers, reference):
    srv = servers.live()
    srv.reference = reference
    return srv


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60)


def post(server, path: str, body, raw: bool = False) -> httpx.Response:
    content = body if raw else json.dumps(body)
    return httpx.post(server.url + path, content=content, headers={"content-type": "application/json"}, timeout=60)


def test_models_and_health(server, client, model_dir):
    assert httpx.get(server.url + "/health").status_code == 200
    models = client.models.list().data
    assert [m.id for m in models] == [Path(model_dir).name]
    assert models[0].model_extra["max_model_len"] == CONTEXT


def test_generate_matches_transformers(server):
    ref = server.reference
    for key in PROMPTS[:2]:
        greedy = ref.greedy[key]
        out = post(server, "/generate", {"input_ids": ref.prompt_ids[key], "return_logprob": True,
                                         "sampling_params": {"temperature": 0, "max_new_tokens": REF_TOKENS,
                                                             "ignore_eos": True}}).json()
        assert out["output_ids"] == greedy["output_ids"]
        logprobs = [lp for lp, _ in out["meta_info"]["output_token_logprobs"]]
        assert max(abs(a - b) for a, b in zip(logprobs, greedy["logprobs"])) < 1e-4
        assert out["meta_info"]["finish_reason"] == {"type": "length", "length": REF_TOKENS}
    # streaming: cumulative results, the last one complete, then [DONE] (how many results come before the
    # last depends on how fast the engine is next to the HTTP loop: a fast engine may have finished already)
    resp = post(server, "/generate", {"input_ids": ref.prompt_ids[PROMPTS[0]], "stream": True,
                                      "sampling_params": {"temperature": 0, "max_new_tokens": REF_TOKENS,
                                                          "ignore_eos": True}})
    events = [e[len("data: "):] for e in resp.text.split("\n\n") if e.startswith("data: ")]
    assert events[-1] == "[DONE]" and len(events) >= 2
    streamed = [json.loads(e)["output_ids"] for e in events[:-1]]
    assert all(later[:len(earlier)] == earlier for earlier, later in itertools.pairwise(streamed))
    assert streamed[-1] == ref.greedy[PROMPTS[0]]["output_ids"]
    # a batch of texts answers a list
    batch = post(server, "/generate", {"text": PROMPTS[:2], "sampling_params": {"temperature": 0,
                                                                               "max_new_tokens": 3}}).json()
    assert isinstance(batch, list) and len(batch) == 2 and all(len(r["output_ids"]) <= 3 for r in batch)


def test_completion_matches_transformers_and_stream(server, client, tokenizer):
    for prompt in PROMPTS[:2]:
        ids, text, reason = server.reference.expected(prompt)
        out = client.completions.create(model=client.models.list().data[0].id, prompt=prompt,
                                        max_tokens=REF_TOKENS, temperature=0)
        assert out.choices[0].text == text
        assert out.choices[0].finish_reason == reason
        assert out.usage.prompt_tokens == len(tokenizer.encode(prompt))
        assert out.usage.completion_tokens == len(ids)
        chunks = list(client.completions.create(model=out.model, prompt=prompt, max_tokens=REF_TOKENS,
                                                temperature=0, stream=True, stream_options={"include_usage": True}))
        streamed = "".join(c.choices[0].text for c in chunks if c.choices)
        assert streamed == text
        finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert finals == [reason]
        assert chunks[-1].usage.completion_tokens == len(ids) and not chunks[-1].choices
    # token-id prompts and logprobs
    ids = tokenizer.encode(PROMPTS[0])
    out = client.completions.create(model=out.model, prompt=ids, max_tokens=5, temperature=0, logprobs=1,
                                    extra_body={"ignore_eos": True})
    assert len(out.choices[0].logprobs.token_logprobs) == 5


def test_chat_matches_transformers_and_stream(server, client, tokenizer):
    prompt_ids = server.reference.prompt_ids["chat"]
    ids, text, reason = server.reference.expected("chat")
    model = client.models.list().data[0].id
    out = client.chat.completions.create(model=model, messages=CHAT, max_tokens=REF_TOKENS, temperature=0)
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == text
    assert out.choices[0].finish_reason == reason
    assert out.usage.prompt_tokens == len(prompt_ids) and out.usage.completion_tokens == len(ids)
    chunks = list(client.chat.completions.create(model=model, messages=CHAT, max_tokens=REF_TOKENS, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [reason]
    assert chunks[-1].usage.total_tokens == len(prompt_ids) + len(ids)
    # without max_tokens the chat default is the rest of the context
    words = 1
    while len(chat_ids(tokenizer, [{"role": "user", "content": "Hello " * (words + 1)}])) <= CONTEXT - 4:
        words += 1
    long_chat = [{"role": "user", "content": "Hello " * words}]
    room = CONTEXT - len(chat_ids(tokenizer, long_chat))
    out = client.chat.completions.create(model=model, messages=long_chat, temperature=0,
                                         extra_body={"ignore_eos": True})
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == room


def test_stop_strings_stream_like_non_stream(server, client, tokenizer):
    model = client.models.list().data[0].id
    base = client.completions.create(model=model, prompt=PROMPTS[1], max_tokens=16, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = base[len(base) // 2: len(base) // 2 + 2]
    assert stop.strip("\ufffd"), f"the fixed greedy continuation {base!r} has no usable stop string"
    out = client.completions.create(model=model, prompt=PROMPTS[1], max_tokens=16, temperature=0, stop=stop,
                                    extra_body={"ignore_eos": True})
    assert out.choices[0].text == base[: base.find(stop)]
    assert out.choices[0].finish_reason == "stop"
    chunks = client.completions.create(model=model, prompt=PROMPTS[1], max_tokens=16, temperature=0, stop=[stop],
                                       stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in chunks) == out.choices[0].text


def test_concurrent_requests_equal_single(server, client, tokenizer):
    model = client.models.list().data[0].id
    prompts = [f"{PROMPTS[i % 4]} {i}" for i in range(16)]
    lengths = [4 + (i * 5) % 13 for i in range(16)]
    single = [client.completions.create(model=model, prompt=p, max_tokens=n, temperature=0,
                                        extra_body={"ignore_eos": True}).choices[0].text
              for p, n in zip(prompts, lengths)]

    async def run_all():
        aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)
        async with aclient:
            async def one(i):
                if i % 2:
                    stream = await aclient.completions.create(model=model, prompt=prompts[i], max_tokens=lengths[i],
                                                              temperature=0, stream=True,
                                                              extra_body={"ignore_eos": True})
                    return "".join([c.choices[0].text async for c in stream])
                out = await aclient.completions.create(model=model, prompt=prompts[i], max_tokens=lengths[i],
                                                       temperature=0, extra_body={"ignore_eos": True})
                return out.choices[0].text

            return await asyncio.gather(*(one(i) for i in range(16)))

    assert asyncio.run(run_all()) == single


BAD = [
    ("/v1/completions", {"prompt": "Hello", "max_tokens": -1}, "max_tokens"),
    ("/v1/completions", {"prompt": "Hello", "max_tokens": 10**9}, "max_tokens"),
    ("/v1/completions", {"prompt": [5] * (CONTEXT + 10), "max_tokens": 1}, "prompt"),
    ("/v1/completions", {"prompt": "Hello " * CONTEXT}, "prompt"),
    ("/v1/completions", {"prompt": "Hello", "temperature": "hot"}, "temperature"),
    ("/v1/completions", {"prompt": "Hello", "temperature": -1}, "temperature"),
    ("/v1/completions", {"prompt": "Hello", "top_p": 2}, "top_p"),
    ("/v1/completions", {"prompt": "Hello", "n": 0}, "n"),
    ("/v1/completions", {"prompt": "Hello", "seed": 1.5}, "seed"),
    ("/v1/completions", {"prompt": "Hello", "stop": ["ok", ""]}, "stop"),
    ("/v1/completions", {"prompt": [10**6]}, "prompt"),
    ("/v1/completions", {"prompt": ""}, "prompt"),
    ("/v1/completions", {"max_tokens": 4}, "prompt"),
    ("/v1/completions", "{\"prompt\": \"Hello\", ", None),
    ("/v1/completions", "not json at all", None),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": CONTEXT}, "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, "stream"),
    ("/generate", {"text": "Hello", "sampling_params": {"max_new_tokens": -3}}, "sampling_params.max_new_tokens"),
    ("/generate", {"text": "Hello", "sampling_params": {"bogus": 1}}, "sampling_params"),
    ("/generate", {"sampling_params": {}}, "text"),
    ("/generate", {"input_ids": [1, 2], "sampling_params": {"seed": "x"}}, "sampling_params.seed"),
]


@pytest.mark.parametrize("seed", [2**70, -2**70])
def test_seeds_of_any_size_are_accepted_and_reproducible(server, seed):
    body = {"prompt": "Hello", "seed": seed, "temperature": 1.0, "max_tokens": 6, "ignore_eos": True}
    first, second = post(server, "/v1/completions", body), post(server, "/v1/completions", body)
    assert first.status_code == second.status_code == 200, first.text
    assert first.json()["choices"][0]["text"] == second.json()["choices"][0]["text"]


@pytest.mark.parametrize("path,body,param", BAD, ids=[f"{i}-{b[0]}" for i, b in enumerate(BAD)])
def test_bad_input_is_400(server, path, body, param):
    resp = post(server, path, body, raw=isinstance(body, str))
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    assert error["param"] == param
    assert set(error) == {"message", "type", "param", "code"}


def test_prefix_cache_hits_in_usage_meta_info_and_metrics(server, client, tokenizer):
    """Three prompts sharing a long system text, one after another: the hybrid model resumes only where a
    state snapshot was taken, and the second prompt takes one where it leaves the first's cached tokens, so
    the third reports those (whole pages of 16) as cached, in OpenAI's usage and in /generate's meta_info.
    The prompts open with the server's prefix-cache query count, which every earlier call of this test (or
    any other) has raised: their first page is new to this server's cache, so it is cold for them."""
    model = client.models.list().data[0].id
    before = httpx.get(server.url + "/metrics").text
    system = (f"Session {_metric(before, 'tandem_prefix_cache_queries_total'):.0f}. "
              + "You are a careful assistant who answers briefly and checks every sum twice. " * 3)
    # each question is longer than a page: the first prompt's last page boundary (its snapshot) lies past
    # the shared text, wherever the session number puts the page boundaries
    questions = ("What is 2+2? Answer with one number and nothing else, please.",
                 "Name a colour that you like, and say why you like it in one line.",
                 "Count to three, slowly, writing every number out in words for me.")
    prompts = [system + question for question in questions]
    ids = [tokenizer.encode(p) for p in prompts]
    shared = next(i for i, (a, b) in enumerate(zip(ids[0], ids[1])) if a != b)
    assert shared >= 32 and ids[2][:shared] == ids[0][:shared]
    assert (len(ids[0]) - 1) // 16 * 16 > shared  # (see the questions)
    usages = [client.completions.create(model=model, prompt=p, max_tokens=2, temperature=0).usage for p in prompts[:2]]
    third = post(server, "/generate", {"input_ids": ids[2], "sampling_params": {"temperature": 0,
                                                                                 "max_new_tokens": 2}}).json()
    assert [u.prompt_tokens_details.cached_tokens for u in usages] == [0, 0]
    assert third["meta_info"]["cached_tokens"] == shared // 16 * 16 > 0
    again = client.completions.create(model=model, prompt=prompts[2], max_tokens=2, temperature=0)
    assert again.usage.prompt_tokens_details.cached_tokens == (len(ids[2]) - 1) // 16 * 16  # its own prompt
    after = httpx.get(server.url + "/metrics").text
    hits = _metric(after, "tandem_prefix_cache_hit_tokens_total") - _metric(before, "tandem_prefix_cache_hit_tokens_total")
    assert hits == shared // 16 * 16 + (len(ids[2]) - 1) // 16 * 16
    assert _metric(after, "tandem_prefix_cache_queries_total") - _metric(before, "tandem_prefix_cache_queries_total") == 4


def test_bad_input_via_openai_client_and_still_serving(server, client):
    model = client.models.list().data[0].id
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=model, prompt="Hello", max_tokens=-5)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=model, messages=CHAT, n=0)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="Hello", max_tokens=2)
    assert httpx.get(server.url + "/health").status_code == 200
    out = client.completions.create(model=model, prompt="Hello", max_tokens=3, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 3


def _metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def test_disconnect_aborts_and_metrics(server):
    aborted = 'tandem_requests_finished_total{finish_reason="abort"}'
    before = httpx.get(server.url + "/metrics").text
    # a streaming client that goes away: its request is aborted and its cache slot freed
    with httpx.stream("POST", server.url + "/v1/completions", timeout=60,
                      json={"prompt": "Hello", "max_tokens": CONTEXT - 8, "temperature": 0, "stream": True,
                            "ignore_eos": True}) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: {"):
                break
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        text = httpx.get(server.url + "/metrics").text
        if _metric(text, "tandem_num_requests_running") == 0 and _metric(text, aborted) > _metric(before, aborted):
            break
        time.sleep(0.2)
    else:
        pytest.fail("the disconnected request was not aborted:\n" + text)
    for name in ("tandem_requests_total", "tandem_prompt_tokens_total", "tandem_generation_tokens_total",
                 "tandem_time_to_first_token_seconds_bucket", "tandem_inter_token_latency_seconds_bucket",
                 "tandem_e2e_request_latency_seconds_bucket", "tandem_num_requests_running",
                 "tandem_num_requests_waiting", "tandem_kv_cache_usage_ratio", "tandem_cache_slots_usage_ratio",
                 "tandem_cache_bytes", "tandem_cache_used_bytes", "tandem_preemptions_total",
                 "tandem_prefix_cache_queries_total", "tandem_prefix_cache_hit_tokens_total",
                 "tandem_prefix_cache_query_tokens_total", "tandem_prefix_cache_hit_rate"):
        assert name in text, name
    assert _metric(text, aborted) == _metric(before, aborted) + 1
    assert _metric(text, "tandem_requests_total") == _metric(before, "tandem_requests_total") + 1
    prompt_tokens = len(server.reference.tokenizer.encode("Hello"))
    assert _metric(text, "tandem_prompt_tokens_total") == _metric(before, "tandem_prompt_tokens_total") + prompt_tokens
    # the client read one token before it went away: at least that one was generated
    assert _metric(text, "tandem_generation_tokens_total") >= _metric(before, "tandem_generation_tokens_total") + 1
    assert 'pp_rank="1",tp_rank="0"' in text and _metric(text, 'tandem_cache_bytes{cache="kv"') > 0


def test_sigterm_stops_server_and_ranks(server):
    ranks = rank_processes(server.proc.pid)
    assert len(ranks) == 2  # pp=2
    # an open stream must not hold the shutdown up
    stream_open = threading.Event()

    def long_stream():
        try:
            with httpx.stream("POST", server.url + "/v1/completions", timeout=60,
                              json={"prompt": "Hello", "max_tokens": CONTEXT - 8, "stream": True,
                                    "ignore_eos": True}) as resp:
                for _ in resp.iter_lines():
                    stream_open.set()
        except httpx.HTTPError:
            pass

    thread = threading.Thread(target=long_stream, daemon=True)
    thread.start()
    assert stream_open.wait(30)
    server.proc.send_signal(signal.SIGTERM)
    # (no speed is asserted: the wait only keeps a hung server from hanging the test run)
    server.proc.wait(60)
    thread.join(30)
    assert not thread.is_alive(), "the open stream outlived the server"
    deadline = time.monotonic() + 30
    while any(alive(pid) for pid in ranks) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(pid) for pid in ranks), "rank processes outlived the server"
    assert server.proc.returncode == 0, server.log.read_text()[-3000:]


# ---- in process, without a model: a failed engine ---------------------------------------------------

class _FakeEngine:
    """The engine surface the app uses (see tandem.engine's docstring); `error` is set as the engine's loop
    sets it when a rank fails, and `health()` reports it as the engine does."""

    model_path = "/models/fake"
    context_length = 64

    def __init__(self):
        from tandem.prompts import PromptBuilder
        from tandem.runtime.scheduling.cache_manager import CacheManager
        from tandem.runtime.scheduling.scheduler import Scheduler

        self.scheduler = Scheduler(CacheManager(256, 16, 4, hybrid=False, radix_cache=True), 64, 16)
        self.prompts = PromptBuilder(None, vocab_size=100, check_length=self.scheduler.check_prompt)
        self.error = None
        self.loop_running = False
        self.shut_down = False

    def health(self):
        return (True, "") if self.error is None else (False, str(self.error))

    def stage_report(self):
        return [{"pp_rank": r, "tp_rank": 0, "kv_cache_bytes": 1000 * r, "state_cache_bytes": 10,
                 "max_total_tokens": 256, "page_size": 16} for r in range(2)]

    def cache_stats(self):
        return self.scheduler.stats()

    def start_background_loop(self):
        self.loop_running = True

    def queue_stats(self):
        return [], 0

    def fault_stats(self):
        return {"rank_failures": 0, "restarts": 0, "recovering": False}

    def add_request(self, req):
        raise AssertionError("no request may reach a failed engine")

    def shutdown(self):
        self.shut_down = True


def test_failed_engine_answers_503():
    from fastapi.testclient import TestClient

    from tandem.errors import RankFailedError
    from tandem.server import create_app

    engine = _FakeEngine()
    with TestClient(create_app(engine)) as http:
        assert http.get("/health").status_code == 200
        assert 'tandem_cache_bytes{cache="kv",pp_rank="1",tp_rank="0"} 1000.0' in http.get("/metrics").text
        engine.error = RankFailedError("rank 1 [pp 1/2 tp 0/1] exited unexpectedly with code -9")
        resp = http.get("/health")
        assert resp.status_code == 503 and "rank 1" in resp.json()["error"]
        resp = http.post("/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 2})
        assert resp.status_code == 503 and resp.json()["error"]["type"] == "server_error"
        assert http.post("/generate", json={"input_ids": [1, 2]}).status_code == 503
        assert "tandem_engine_healthy 0.0" in http.get("/metrics").text
        # bad input is still a 400, not a 503 or a crash
        assert http.post("/v1/completions", content=b"{", headers={"content-type": "application/json"}
                         ).status_code == 400
    assert engine.shut_down
