"""`tandem serve` under abuse and faults (real servers, real sockets, loopback only; issue 11).

Two live servers (pp=2, fp32), each started once and again only after a test stopped it:
- `guarded`: --api-key; the default queue bound and body limit. Hostile requests get 200 or a 4xx and
  the server then answers a canary prompt with the same greedy text; a rank killed with SIGKILL during 16
  concurrent requests is replaced and every request gets exactly its fault-free tokens; a pickle pushed
  to every port its processes listen on runs nothing; 1,500 tiny requests at concurrency 384 are all
  served; a client that disconnects frees its request; SIGTERM during load ends every request cleanly.
- `fragile`: a checkpoint whose token 310 has a NaN embedding, --max-queued-requests 8 and
  --max-rank-restarts 1. A request containing token 310 fails alone (500 / an error event), the other
  requests get their own tokens; 1,500 requests get 200 or 429; a second rank failure makes the server
  exit with code 1 and the cause.

The canary's answer is transformers' greedy continuation on the server's own checkpoint; the killed-rank
and NaN tests compare with the same server's fault-free answers to the same requests, made just before."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
import zmq
from safetensors.torch import load_file, save_file

from support.processes import rank_processes
from support.reference import hf_greedy
from support.server import ServeProcess, ServerPool, children, listening_sockets, served_checkpoint

CONTEXT = 256
KEY = "sk-tandem-test-3f9a"
POISON = 310  # in the model's vocabulary (320), outside the test tokenizer's (300)
COMMON = ["--pp-size", "2", "--dtype", "float32", "--context-length", str(CONTEXT)]
CANARY = {"prompt": "The cat sees a red ball", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
PROMPTS = ["Hello, world!", "The cat sees a red ball", "12+34=", "How are you?"]


@pytest.fixture(scope="module")
def model_dir(request, tmp_path_factory):
    return served_checkpoint(request, tmp_path_factory)


@pytest.fixture(scope="module")
def poisoned_dir(model_dir, tmp_path_factory):
    """The same checkpoint, except that token POISON embeds as NaN (every request containing it gets NaN
    hidden states, then NaN logits) and its LM-head row is 0 (its logit is 0, so greedy decoding of other
    prompts never picks it)."""
    out = tmp_path_factory.mktemp("poisoned")
    for file in Path(model_dir).iterdir():
        if file.is_file():
            (out / file.name).write_bytes(file.read_bytes())
    weights = load_file(out / "model.safetensors")
    weights["model.embed_tokens.weight"][POISON] = float("nan")
    weights["lm_head.weight"][POISON] = 0.0
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    return out


def hf_canary(model_dir: Path) -> str:
    """transformers' greedy text for CANARY on `model_dir` (EOS ignored, as the canary asks)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    ids = hf_greedy(model_dir, [tokenizer.encode(CANARY["prompt"])], CANARY["max_tokens"])[0]["output_ids"]
    return tokenizer.decode(ids, skip_special_tokens=True)


@pytest.fixture(scope="module")
def pools(model_dir, poisoned_dir, tmp_path_factory):
    logs = tmp_path_factory.mktemp("reliab_logs")
    made = {"guarded": ServerPool(model_dir, logs, "guarded", COMMON + ["--graceful-shutdown-timeout", "2"], KEY),
            "fragile": ServerPool(poisoned_dir, logs, "fragile",
                                  COMMON + ["--max-queued-requests", "8", "--max-rank-restarts", "1"])}
    for pool in made.values():
        pool.start()  # loads while the canaries' references are computed
    try:
        yield made
    finally:
        for pool in made.values():
            pool.stop()


@pytest.fixture(scope="module")
def canaries(pools) -> dict[str, str]:  # after `pools`: computed while the servers load
    return {name: hf_canary(pool.model_dir) for name, pool in pools.items()}


def _live(pools: dict, canaries: dict, name: str, fresh: bool = False) -> ServeProcess:
    srv = pools[name].fresh() if fresh else pools[name].live()
    srv.canary = canaries[name]  # what a healthy server answers to CANARY
    return srv


@pytest.fixture
def guarded(pools, canaries) -> ServeProcess:
    return _live(pools, canaries, "guarded")


@pytest.fixture
def fragile(pools, canaries) -> ServeProcess:
    return _live(pools, canaries, "fragile")


@pytest.fixture
def fresh_fragile(pools, canaries) -> ServeProcess:
    """A fragile server no earlier test has used: its one allowed restart is still to come."""
    return _live(pools, canaries, "fragile", fresh=True)


def post(srv: ServeProcess, path: str, body, headers: dict | None = None, timeout: float = 120) -> httpx.Response:
    content = body if isinstance(body, bytes) else body.encode() if isinstance(body, str) else json.dumps(body)
    return httpx.post(srv.url + path, content=content, timeout=timeout,
                      headers={"content-type": "application/json", **srv.headers, **(headers or {})})


def canary(srv: ServeProcess) -> str:
    resp = post(srv, "/v1/completions", CANARY)
    assert resp.status_code == 200, resp.text
    return resp.json()["choices"][0]["text"]


def metric(srv: ServeProcess, name: str) -> float:
    text = httpx.get(srv.url + "/metrics", headers=srv.headers, timeout=30).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def sse_events(text: str) -> list[str]:
    return [e[len("data: "):] for e in text.split("\n\n") if e.startswith("data: ")]


# ---- access control --------------------------------------------------------------------------------

def test_api_key(guarded):
    url = guarded.url
    for method, path in (("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
                         ("POST", "/generate"), ("GET", "/metrics"), ("GET", "/get_model_info")):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            resp = httpx.request(method, url + path, headers=headers, json=CANARY, timeout=30)
            assert resp.status_code == 401, (path, headers, resp.text)
            assert resp.json() == {"error": {"message": resp.json()["error"]["message"],
                                             "type": "invalid_request_error", "param": None,
                                             "code": "invalid_api_key"}}
    assert httpx.get(url + "/health", timeout=30).status_code == 200  # no key needed
    assert httpx.get(url + "/v1/models", headers=guarded.headers, timeout=30).status_code == 200
    assert post(guarded, "/v1/completions", CANARY).status_code == 200
    # the official client (which always sends a key): wrong key / right key
    client = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0, timeout=60)
    with pytest.raises(openai.AuthenticationError):
        client.completions.create(model="any", prompt="Hello", max_tokens=2)
    client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    out = client.completions.create(model=client.models.list().data[0].id, prompt=CANARY["prompt"],
                                    max_tokens=CANARY["max_tokens"], temperature=0, extra_body={"ignore_eos": True})
    assert out.choices[0].text == guarded.canary


# ---- hostile requests ------------------------------------------------------------------------------

P = {"prompt": "Hello", "max_tokens": 4, "temperature": 0}
CHAT = "/v1/chat/completions"
GEN = "/generate"


def _with(**changes) -> dict:
    return {**P, **changes}


def _chat(messages, **extra) -> dict:
    return {"messages": messages, "max_tokens": 4, **extra}


def _nested(depth: int) -> str:
    return '{"prompt": ' + "[" * depth + "]" * depth + "}"


def _chunked(size: int):
    def body():
        chunk = b" " * 65536
        for _ in range(size // len(chunk)):
            yield chunk
    return body


# (id, path, body: dict | raw str/bytes | a callable giving a chunked body, expected status)
HOSTILE = [
    ("temperature-nan", None, '{"prompt": "Hello", "max_tokens": 4, "temperature": NaN}', 400),
    ("temperature-inf", None, '{"prompt": "Hello", "max_tokens": 4, "temperature": Infinity}', 400),
    ("top-p-minus-inf", None, '{"prompt": "Hello", "max_tokens": 4, "top_p": -Infinity}', 400),
    ("temperature-1e-39", None, _with(temperature=1e-39), 200),
    ("temperature-1e308", None, _with(temperature=1e308), 200),
    ("top-p-tiny", None, _with(temperature=1.0, top_p=1e-300), 200),
    ("top-k-huge", None, _with(temperature=1.0, top_k=2 ** 70), 200),
    ("top-k-negative", None, _with(top_k=-7), 400),
    ("min-p-above-1", None, _with(min_p=1.5), 400),
    ("seed-huge", None, _with(temperature=1.0, seed=2 ** 200), 200),
    ("seed-negative-huge", None, _with(temperature=1.0, seed=-(2 ** 200)), 200),
    ("max-tokens-huge", None, _with(max_tokens=2 ** 70), 400),
    ("max-tokens-zero", None, _with(max_tokens=0), 200),
    ("token-id-negative", None, _with(prompt=[-1]), 400),
    ("token-id-huge", None, _with(prompt=[2 ** 64]), 400),
    ("token-id-float-overflow", None, '{"prompt": [5, 1e400], "max_tokens": 4}', 400),
    ("prompt-empty", None, _with(prompt=""), 400),
    ("prompt-empty-ids", None, _with(prompt=[]), 400),
    ("prompt-over-long", None, _with(prompt="x " * 20000), 400),
    ("prompts-thousands", None, _with(prompt=["Hi"] * 5000), 400),
    ("stop-strings-thousands", None, _with(stop=[f"s{i}" for i in range(5000)]), 400),
    ("stop-string-huge", None, _with(stop=["x" * 100000]), 400),
    ("stop-token-ids-huge", None, _with(stop_token_ids=[2 ** 70]), 400),
    ("stop-token-ids-negative", None, _with(stop_token_ids=[-1]), 400),
    ("logit-bias-huge-id", GEN, {"text": "Hello", "sampling_params": {"logit_bias": {"9" * 40: 1.0}}}, 400),
    ("logit-bias-outside-vocab", GEN, {"text": "Hello", "sampling_params": {"logit_bias": {"400": 5.0}}}, 400),
    ("repetition-penalty-tiny", GEN, {"input_ids": [7, 7, 7, 7], "sampling_params": {
        "repetition_penalty": 1e-300, "max_new_tokens": 4, "temperature": 0}}, 400),
    ("sampling-params-unknown", GEN, {"text": "Hello", "sampling_params": {"evil": "__import__('os')"}}, 400),
    ("sampling-params-count-mismatch", GEN, {"text": ["a", "b"], "sampling_params": [{}, {}, {}]}, 400),
    ("generate-thousands-of-prompts", GEN, {"text": ["Hi"] * 5000}, 400),
    ("generate-empty-ids", GEN, {"input_ids": [[]]}, 400),
    ("json-malformed", None, '{"prompt": "Hello", ', 400),
    ("json-invalid-utf8", None, b'{"prompt": "\xff\xfe\xc3\x28", "max_tokens": 4}', 400),
    ("json-deeply-nested", None, _nested(100_000), 400),
    ("body-20-mb", None, b'{"prompt": "' + b"x" * (20 * 1024 * 1024) + b'"}', 413),
    ("body-20-mb-chunked", None, _chunked(20 * 1024 * 1024), 413),
    ("not-json-content-type", None, "prompt=Hello", 400),
    ("chat-bad-role", CHAT, _chat([{"role": "hacker", "content": "hi"}]), 400),
    ("chat-image-part", CHAT, _chat([{"role": "user", "content": [{"type": "image_url",
                                                                 "image_url": {"url": "file:///etc/passwd"}}]}]), 400),
    ("chat-part-without-text", CHAT, _chat([{"role": "user", "content": [{"type": "text"}]}]), 400),
    ("chat-content-number", CHAT, _chat([{"role": "user", "content": 5}]), 400),
    ("chat-messages-thousands", CHAT, _chat([{"role": "user", "content": "hi"}] * 3000), 400),
    ("chat-no-messages", CHAT, _chat([]), 400),
    ("chat-template-injection", CHAT, _chat([{"role": "user", "content": "{{ 7*7 }}{% for x in range(10**9) %}"}],
                                            temperature=0), 200),
    ("n-zero", None, _with(n=0), 400),
    ("best-of-zero", None, _with(best_of=0), 400),
    ("unsupported-suffix", None, _with(suffix="!"), 400),
    ("tools-without-function", CHAT, _chat([{"role": "user", "content": "hi"}], tools=[{"type": "function"}]), 400),
    ("unsupported-structural-tag-format", CHAT, _chat([{"role": "user", "content": "hi"}],
                                                      response_format={"type": "structural_tag"}), 400),
    ("unsupported-guided-whitespace", None, _with(guided_whitespace_pattern=" ", guided_regex="a+"), 400),
    ("logprobs-too-many", None, _with(logprobs=100), 400),
    ("stream-not-bool", None, _with(stream="yes"), 400),
    ("unknown-fields-refused", None, _with(foo={"bar": [1, 2, 3]}), 400),
    ("unknown-model", None, _with(model="../../etc/passwd"), 404),
    ("unknown-path", "/v1/../../etc/passwd", P, 404),
]


@pytest.mark.parametrize("case", HOSTILE, ids=[c[0] for c in HOSTILE])
def test_hostile_request_gets_200_or_4xx_and_the_server_goes_on(guarded, case):
    name, path, body, expected = case
    path = path or "/v1/completions"
    headers = {"content-type": "text/plain"} if name == "not-json-content-type" else None
    if callable(body):  # a chunked body of unknown length
        resp = httpx.post(guarded.url + path, content=body(), timeout=120,
                          headers={"content-type": "application/json", **guarded.headers})
    else:
        resp = post(guarded, path, body, headers)
    assert resp.status_code < 500, resp.text[:1000]
    assert resp.status_code == expected, resp.text[:1000]
    if resp.status_code >= 400:
        error = resp.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert httpx.get(guarded.url + "/health", timeout=30).status_code == 200
    assert canary(guarded) == guarded.canary


OUTSIDE_VOCAB = {"400": 5.0}  # the model's vocabulary is 320 tokens


@pytest.mark.parametrize("path, body, param", [
    (None, _with(logit_bias=OUTSIDE_VOCAB), "logit_bias"),
    (None, _with(logit_bias=OUTSIDE_VOCAB, stream=True, n=2), "logit_bias"),
    (CHAT, _chat([{"role": "user", "content": "hi"}], logit_bias=OUTSIDE_VOCAB), "logit_bias"),
    (GEN, {"text": ["a", "b"], "sampling_params": [{}, {"logit_bias": OUTSIDE_VOCAB}]}, "sampling_params.logit_bias"),
], ids=["completions", "completions-streamed-n2", "chat", "generate-second-prompt"])
def test_logit_bias_outside_the_vocabulary_is_a_400_naming_the_field(guarded, path, body, param):
    # the engine's one vocabulary check (Engine.add_request), turned into a 400 naming the field by the bridge
    resp = post(guarded, path or "/v1/completions", body)
    assert resp.status_code == 400, resp.text[:1000]
    error = resp.json()["error"]
    assert error["param"] == param and "outside the vocabulary" in error["message"], error
    assert canary(guarded) == guarded.canary


# ---- a rank killed during load ---------------------------------------------------------------------

async def _completion_stream(client: httpx.AsyncClient, body: dict, started: asyncio.Event) -> str:
    text, chunks = "", 0
    async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as resp:
        assert resp.status_code == 200
        async for line in resp.aiter_lines():
            if line.startswith("data: {"):
                event = json.loads(line[len("data: "):])
                assert "error" not in event, event
                text += event["choices"][0]["text"]
                chunks += 1
                if chunks == 3:
                    started.set()
    return text


async def _generate(client: httpx.AsyncClient, body: dict, stream: bool) -> list[int]:
    resp = await client.post("/generate", json={**body, "stream": stream})
    assert resp.status_code == 200, resp.text
    if not stream:
        return resp.json()["output_ids"]
    events = sse_events(resp.text)
    assert events[-1] == "[DONE]" and all("error" not in json.loads(e) for e in events[:-1])
    return json.loads(events[-2])["output_ids"]


def _load(i: int) -> tuple[str, dict]:
    """Request i of the 16: streaming completions, /generate (streaming or not), each greedy and long."""
    prompt, n = f"{PROMPTS[i % 4]} {i}", 40 + i
    if i % 2 == 0:
        return "stream", {"prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True}
    params = {"max_new_tokens": n, "temperature": 0, "ignore_eos": True}
    return ("generate-stream" if i % 4 == 1 else "generate"), {"text": prompt, "sampling_params": params}


async def _run_load(srv: ServeProcess, started: asyncio.Event) -> list:
    async with httpx.AsyncClient(base_url=srv.url, headers=srv.headers, timeout=300) as client:
        tasks = []
        for i in range(16):
            kind, body = _load(i)
            if kind == "stream":
                tasks.append(_completion_stream(client, body, started))
            else:
                tasks.append(_generate(client, body, kind == "generate-stream"))
        return await asyncio.gather(*tasks)


def test_killed_rank_loses_no_request(guarded):
    reference = asyncio.run(_run_load(guarded, asyncio.Event()))  # fault-free
    restarts = metric(guarded, "tandem_engine_restarts_total")
    failures = metric(guarded, "tandem_rank_failures_total")
    ranks = rank_processes(guarded.proc.pid)
    assert len(ranks) == 2
    health_after_kill = []

    async def run_with_kill():
        started = asyncio.Event()
        load = asyncio.ensure_future(_run_load(guarded, started))
        await started.wait()  # a stream has received tokens: every request is running
        os.kill(ranks[1], signal.SIGKILL)
        async with httpx.AsyncClient(base_url=guarded.url, timeout=30) as client:
            # the kernel reaps the rank a moment after the signal: look until /health turns (bounded)
            for _ in range(100):
                health_after_kill.append((await client.get("/health")).status_code)
                if health_after_kill[-1] == 503:
                    break
                await asyncio.sleep(0.02)
        return await load

    assert asyncio.run(run_with_kill()) == reference
    assert health_after_kill[-1] == 503  # the dead rank shows within moments; the restart takes far longer
    guarded.wait_healthy()
    assert metric(guarded, "tandem_engine_restarts_total") == restarts + 1
    assert metric(guarded, "tandem_rank_failures_total") == failures + 1
    new_ranks = rank_processes(guarded.proc.pid)
    assert len(new_ranks) == 2 and not set(new_ranks) & set(ranks)
    assert "rank failure" in guarded.log_text()
    assert canary(guarded) == guarded.canary


# ---- the control plane runs nothing it is sent -----------------------------------------------------

def evil_pickle(path: Path) -> bytes:
    """A protocol-0 pickle whose loading runs `touch <path>` (written by hand: this test imports no pickle)."""
    return f"cos\nsystem\n(S'touch {path}'\ntR.".encode()


def test_pickles_pushed_to_every_port_run_nothing(guarded, tmp_path):
    # control: the payload does create its file when unpickled
    control = tmp_path / "control"
    subprocess.run([sys.executable, "-c", "import pickle, sys; pickle.loads(sys.stdin.buffer.read())"],
                   input=evil_pickle(control), check=True)
    assert control.exists()

    target = tmp_path / "pwned"
    payload = evil_pickle(target)
    pids = [guarded.proc.pid, *children(guarded.proc.pid)]
    sockets = listening_sockets(pids)
    assert all(address in ("127.0.0.1", "::1") for _, address, _ in sockets), sockets  # loopback only
    ports = sorted({port for _, _, port in sockets} - {guarded.port})
    assert len(ports) >= 2, sockets  # the driver's step feed and result channel at least
    context = zmq.Context()
    try:
        for port in ports:
            for data in (payload, b"\x00" * 16 + payload, b"\xff" + payload * 50):
                with socket_to(port) as conn:
                    conn.sendall(data)
            for kind in (zmq.PUSH, zmq.DEALER, zmq.PUB):  # well-formed ZMQ frames carrying the pickle
                sock = context.socket(kind)
                sock.setsockopt(zmq.LINGER, 500)
                sock.connect(f"tcp://127.0.0.1:{port}")
                for frames in ([payload], [b"\x00" * 32, payload], [payload, payload, payload]):
                    try:
                        sock.send_multipart(frames, flags=zmq.NOBLOCK)
                    except zmq.Again:
                        pass
                time.sleep(0.2)
                sock.close()
    finally:
        context.term()
    time.sleep(1)  # time for anything that would run the payload to have run it
    assert not target.exists()
    assert httpx.get(guarded.url + "/health", timeout=30).status_code == 200
    assert canary(guarded) == guarded.canary
    assert "control plane: dropped" in guarded.log_text()


def socket_to(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=5)


# ---- overload ----------------------------------------------------------------------------------------

async def _flood(srv: ServeProcess, total: int = 1500, concurrency: int = 384) -> list[httpx.Response]:
    jobs = iter(range(total))
    responses: list = []
    # a connection per request: reusing idle keep-alive connections races with the server closing them
    # (uvicorn's keep-alive timeout), which no server can prevent
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=srv.url, headers=srv.headers, timeout=300, limits=limits) as client:
        async def worker():
            for i in jobs:
                body = {"prompt": [5 + i % 200, 6, 7], "max_tokens": 1 + i % 2, "temperature": 0}
                responses.append(await client.post("/v1/completions", json=body))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return responses


def _check_flood(srv: ServeProcess, responses: list[httpx.Response]) -> int:
    """Every response is a complete 200 or a 429 with Retry-After; returns the number of 429s."""
    assert len(responses) == 1500
    refused = 0
    for resp in responses:
        assert resp.status_code in (200, 429), resp.text
        if resp.status_code == 429:
            refused += 1
            assert resp.headers["retry-after"] == "1"
            assert resp.json()["error"]["code"] == "queue_full"
        else:
            assert resp.json()["choices"][0]["finish_reason"] in ("length", "stop")
    return refused


def test_small_queue_bound_answers_200_or_429(fragile):
    before = metric(fragile, 'tandem_rejected_requests_total{reason="queue_full"}')
    # the bound itself, whatever the server's speed: with nothing waiting, a call of 8 prompts fits the
    # queue of 8 and a call of 9 does not
    assert post(fragile, "/v1/completions", {"prompt": ["Hi"] * 8, "max_tokens": 1}).status_code == 200
    over = post(fragile, "/v1/completions", {"prompt": ["Hi"] * 9, "max_tokens": 1})
    assert over.status_code == 429 and over.headers["retry-after"] == "1", over.text
    assert over.json()["error"]["code"] == "queue_full"
    # under a flood (how many find the queue full depends on speed): each a complete 200 or a 429, counted
    refused = _check_flood(fragile, asyncio.run(_flood(fragile)))
    assert refused < 1500  # the first arrivals find room
    assert metric(fragile, 'tandem_rejected_requests_total{reason="queue_full"}') == before + 1 + refused
    assert metric(fragile, "tandem_num_requests_waiting") == 0 and metric(fragile, "tandem_num_requests_running") == 0


def test_default_queue_bound_refuses_nothing(guarded):
    assert _check_flood(guarded, asyncio.run(_flood(guarded))) == 0
    assert canary(guarded) == guarded.canary


def test_disconnected_client_frees_its_request(guarded):
    aborted = 'tandem_requests_finished_total{finish_reason="abort"}'
    before, generated = metric(guarded, aborted), metric(guarded, "tandem_generation_tokens_total")
    body = json.dumps({"prompt": "Hello", "max_tokens": CONTEXT - 8, "temperature": 0, "ignore_eos": True}).encode()
    with socket_to(guarded.port) as conn:  # a non-streaming client that goes away while it waits
        conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        deadline = time.monotonic() + 60  # (only bounds a broken server)
        while metric(guarded, "tandem_num_requests_running") == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
    deadline = time.monotonic() + 60
    while metric(guarded, aborted) == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(guarded, aborted) == before + 1
    assert metric(guarded, "tandem_num_requests_running") == 0
    # freed before it was done: fewer tokens were generated than it asked for
    assert metric(guarded, "tandem_generation_tokens_total") - generated < CONTEXT - 8


# ---- per-request numeric failures --------------------------------------------------------------------

def test_nan_logits_fail_one_request_only(fragile):
    normal = [{"prompt": p, "max_tokens": 12, "temperature": 0, "ignore_eos": True} for p in PROMPTS]
    alone = [post(fragile, "/v1/completions", body).json()["choices"][0]["text"] for body in normal]
    errors_before = metric(fragile, 'tandem_requests_finished_total{finish_reason="error"}')
    poisoned = {"prompt": [5, 6, POISON, 7], "max_tokens": 12, "temperature": 0, "ignore_eos": True}

    async def run_all():
        async with httpx.AsyncClient(base_url=fragile.url, timeout=300) as client:
            calls = [client.post("/v1/completions", json={**body, "stream": i % 2 == 1}) for i, body in enumerate(normal)]
            calls += [client.post("/v1/completions", json=poisoned),
                      client.post("/v1/completions", json={**poisoned, "stream": True}),
                      client.post("/generate", json={"input_ids": [POISON, 9], "sampling_params": {"temperature": 0}})]
            return await asyncio.gather(*calls)

    responses = asyncio.run(run_all())
    for i, resp in enumerate(responses[:4]):
        assert resp.status_code == 200
        if i % 2:
            text = "".join(json.loads(e)["choices"][0]["text"] for e in sse_events(resp.text)[:-1])
        else:
            text = resp.json()["choices"][0]["text"]
        assert text == alone[i]
    for resp in (responses[4], responses[6]):  # non-streaming: a 500 naming the cause, as vLLM answers
        assert resp.status_code == 500
        error = resp.json()["error"]
        assert error["type"] == "server_error" and error["code"] == "generation_failed" and "NaN" in error["message"]
    stream = sse_events(responses[5].text)  # streaming: an error event, then [DONE]
    assert responses[5].status_code == 200 and stream[-1] == "[DONE]"
    error = json.loads(stream[-2])["error"]
    assert error["code"] == "generation_failed" and "NaN" in error["message"]
    assert all("error" not in json.loads(e) for e in stream[:-2])
    assert metric(fragile, 'tandem_requests_finished_total{finish_reason="error"}') == errors_before + 3
    assert httpx.get(fragile.url + "/health", timeout=30).status_code == 200
    assert canary(fragile) == fragile.canary


# ---- restarts that keep failing -----------------------------------------------------------------------

def test_repeated_rank_failures_make_the_server_exit_nonzero(fresh_fragile):
    fragile = fresh_fragile
    assert metric(fragile, "tandem_engine_restarts_total") == 0
    restarts = 0
    first = rank_processes(fragile.proc.pid)
    os.kill(first[0], signal.SIGKILL)
    deadline = time.monotonic() + 30  # until the server has seen the death (bounded: no hang)
    while httpx.get(fragile.url + "/health").status_code == 200 and time.monotonic() < deadline:
        time.sleep(0.02)
    fragile.wait_healthy()  # restarted (1 restart allowed)
    assert metric(fragile, "tandem_engine_restarts_total") == restarts + 1
    assert canary(fragile) == fragile.canary
    second = rank_processes(fragile.proc.pid)
    assert len(second) == 2 and not set(second) & set(first)
    os.kill(second[0], signal.SIGKILL)
    assert fragile.proc.wait(120) == 1  # (the bound only keeps a hung server from hanging the run)
    log = fragile.log_text()
    assert "giving up" in log and "exiting with code 1" in log
    assert rank_processes(fragile.proc.pid) == []


# ---- SIGTERM during load -----------------------------------------------------------------------------

def test_sigterm_during_load_ends_every_request_cleanly(guarded):
    ranks = rank_processes(guarded.proc.pid)
    body = {"prompt": "Hello", "max_tokens": CONTEXT - 16, "temperature": 0, "ignore_eos": True}

    async def run():
        async with httpx.AsyncClient(base_url=guarded.url, headers=guarded.headers, timeout=120) as client:
            streams_open = [asyncio.Event() for _ in range(6)]

            async def stream(i):
                async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as resp:
                    lines = []
                    async for line in resp.aiter_lines():
                        if line.startswith("data: "):
                            lines.append(line[len("data: "):])
                            streams_open[i].set()
                    return resp.status_code, lines

            tasks = [asyncio.ensure_future(stream(i)) for i in range(6)]
            tasks += [asyncio.ensure_future(client.post("/v1/completions", json=body)) for _ in range(6)]
            for event in streams_open:
                await event.wait()
            while (await client.get("/metrics")).text.count("tandem_num_requests_running 12.0") == 0:
                await asyncio.sleep(0.05)
            guarded.proc.send_signal(signal.SIGTERM)
            return await asyncio.gather(*tasks)

    results = asyncio.run(run())
    for status, lines in results[:6]:  # streams: to the end with a finish_reason, or an error event; then [DONE]
        assert status == 200 and lines[-1] == "[DONE]"
        last = json.loads(lines[-2])
        if "error" in last:
            assert last["error"]["code"] == "server_shutting_down"
        else:
            assert last["choices"][0]["finish_reason"] == "length"
    for resp in results[6:]:  # non-streaming: the whole answer, or a 503 naming the shutdown
        if resp.status_code == 200:
            assert resp.json()["usage"]["completion_tokens"] == CONTEXT - 16
        else:
            assert resp.status_code == 503 and resp.json()["error"]["code"] == "server_shutting_down"
    assert guarded.proc.wait(120) == 0  # (the bound only keeps a hung server from hanging the run)
    # the server reaps its ranks before it exits: none is left, not even as a zombie
    assert [pid for pid in ranks if _is_rank(pid)] == []


def _is_rank(pid: int) -> bool:
    try:
        return b"tandem.executors.rank" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


# ---- in process: tokenization leaves the event loop free ---------------------------------------------

class _BlockingPrompts:
    """A PromptBuilder stand-in whose tokenization blocks until released."""

    vocab_size = 100

    def __init__(self):
        import threading

        self.entered, self.release = threading.Event(), threading.Event()
        self.released = None

    def from_prompt(self, prompt, field):
        self.entered.set()
        self.released = self.release.wait(60)  # False only if the event loop could not answer meanwhile
        return [[1, 2, 3]]


class _InstantEngine:
    """The engine surface the app uses; every request finishes with one token as soon as it is added."""

    model_path, context_length, error, loop_running = "/models/fake", 64, None, True

    def __init__(self):
        self.prompts = _BlockingPrompts()

    def health(self):
        return True, ""

    def queue_stats(self):
        return [], 0

    def fault_stats(self):
        return {"rank_failures": 0, "restarts": 0, "recovering": False}

    def add_request(self, req):
        req.output_ids.append(7)
        req.output_logprobs.append(-0.5)
        req.finish_reason = {"type": "length", "length": 1}
        req.on_update(req)

    def abort_request(self, rid):
        pass

    def text_of(self, req):
        return "x"

    def decode(self, ids):
        return "x" * len(ids)


def test_tokenization_runs_off_the_event_loop():
    from tandem.server import create_app

    engine = _InstantEngine()
    app = create_app(engine, shutdown_engine=False)

    async def run():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            pending = asyncio.ensure_future(client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1}))
            assert await asyncio.to_thread(engine.prompts.entered.wait, 60)
            health = await client.get("/health")  # answered while the tokenizer is still busy
            engine.prompts.release.set()
            return health, await pending

    health, completion = asyncio.run(run())
    assert health.status_code == 200 and engine.prompts.released
    assert completion.status_code == 200 and completion.json()["choices"][0]["text"] == "x"
