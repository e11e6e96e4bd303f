"""What the server lets in: the API key, the size of a request body, room in the queue, and per-call caps.

`ServerLimits` holds the operator's settings (the `tandem serve` flags). `RequestGuard` is the ASGI
middleware that runs before any body is parsed: every path but /health needs `Authorization: Bearer
<key>` when a key is set (else 401), and a body larger than `max_request_body` bytes is refused with 413
without being read past the limit. `check_caps(body)` is called by each endpoint on its parsed body and
answers 400 for a call with more than `MAX_PROMPTS` prompts, `MAX_MESSAGES` messages, a role outside
`CHAT_ROLES`, more than `MAX_STOP` stop strings (or one longer than `MAX_STOP_CHARS`), more than
`MAX_STOP_TOKEN_IDS` stop_token_ids or `MAX_LOGIT_BIAS` logit_bias entries: each of these costs the
engine work on every generated token or the tokenizer work per prompt, so a bound keeps one call from
slowing every other. Output length needs no cap here: `max_tokens` beyond the context left by the prompt
is already a 400. The queue bound (`max_queued_requests`, 429 with Retry-After) is applied when requests
are submitted (`EngineBridge.admit`). All errors have OpenAI's shape."""

from __future__ import annotations

import hmac
import json
from dataclasses import dataclass

from tandem.errors import ConfigError
from tandem.server.protocol import APIError

MAX_PROMPTS = 256  # prompts per call (/v1/completions prompt list, /generate batch)
MAX_MESSAGES = 2048  # chat messages per call
MAX_STOP = 64  # stop strings per request
MAX_STOP_CHARS = 1024  # characters per stop string
MAX_STOP_TOKEN_IDS = 1024
MAX_LOGIT_BIAS = 1024  # logit_bias entries per request
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool", "function")
DEFAULT_MAX_QUEUED_REQUESTS = 1024
DEFAULT_MAX_REQUEST_BODY = 8 * 1024 * 1024  # bytes
RETRY_AFTER_S = 1
UNGUARDED_PATHS = ("/health",)


@dataclass(frozen=True)
class ServerLimits:
    api_key: str | None = None
    max_queued_requests: int = DEFAULT_MAX_QUEUED_REQUESTS
    max_request_body: int = DEFAULT_MAX_REQUEST_BODY

    def __post_init__(self) -> None:
        if self.max_queued_requests < 0:
            raise ConfigError(f"--max-queued-requests must be >= 0, got {self.max_queued_requests}")
        if self.max_request_body < 1:
            raise ConfigError(f"--max-request-body must be >= 1 byte, got {self.max_request_body}")


class QueueFullError(APIError):
    """429: no room in the waiting queue for the call's requests; `headers` carries Retry-After."""

    def __init__(self, waiting: int, wanted: int, bound: int):
        super().__init__(f"the server is overloaded: {waiting} request(s) are waiting and this call adds {wanted}, "
                         f"beyond the bound of {bound} (--max-queued-requests); retry later",
                         status=429, type="rate_limit_error", code="queue_full")
        self.headers = {"Retry-After": str(RETRY_AFTER_S)}


def _error_body(message: str, code: str, type: str = "invalid_request_error") -> bytes:
    return json.dumps({"error": {"message": message, "type": type, "param": None, "code": code}}).encode()


class RequestGuard:
    """ASGI middleware: API key, then body size (see the module docstring). `on_reject(reason)` counts
    refusals ("unauthorized", "body_too_large")."""

    def __init__(self, app, limits: ServerLimits, on_reject=None):
        self.app, self.limits, self.on_reject = app, limits, on_reject
        self._expected = f"Bearer {limits.api_key}".encode() if limits.api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        if self._expected is not None and scope.get("path") not in UNGUARDED_PATHS:
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, self._expected):
                message = "missing API key: send `Authorization: Bearer <key>`" if not given else "invalid API key"
                await self._reject(send, 401, "unauthorized", _error_body(message, "invalid_api_key"),
                                   [(b"www-authenticate", b"Bearer")])
                return
        limit = self.limits.max_request_body
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            await self._too_large(send)
            return
        chunks, size = [], 0
        while True:  # read the body here (FastAPI reads it whole anyway) to stop at the limit
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending it all
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                await self._too_large(send)
                return
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # after the body: http.disconnect when the client goes away

        await self.app(scope, replay, send)

    async def _too_large(self, send) -> None:
        message = (f"the request body is larger than {self.limits.max_request_body} bytes "
                   f"(--max-request-body)")
        # Connection: close, since the rest of the body is never read
        await self._reject(send, 413, "body_too_large", _error_body(message, "request_too_large"),
                           [(b"connection", b"close")])

    async def _reject(self, send, status: int, reason: str, body: bytes, extra_headers: list) -> None:
        if self.on_reject is not None:
            self.on_reject(reason)
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()), *extra_headers]})
        await send({"type": "http.response.body", "body": body})


def _count(value) -> int:
    return len(value) if isinstance(value, (list, tuple, dict)) else 0


def _check_stop(stop, param: str) -> None:
    stops = [stop] if isinstance(stop, str) else list(stop) if isinstance(stop, (list, tuple)) else []
    if len(stops) > MAX_STOP:
        raise APIError(f"{param} has {len(stops)} entries; at most {MAX_STOP} are accepted", param=param)
    for s in stops:
        if isinstance(s, str) and len(s) > MAX_STOP_CHARS:
            raise APIError(f"{param} entries may have at most {MAX_STOP_CHARS} characters, got {len(s)}",
                           param=param)


def _check_sampling(values, prefix: str) -> None:
    """stop / stop_token_ids / logit_bias of an object (a request body) or a dict (/generate's
    sampling_params)."""
    get = values.get if isinstance(values, dict) else lambda name: getattr(values, name, None)
    _check_stop(get("stop"), prefix + "stop")
    if _count(get("stop_token_ids")) > MAX_STOP_TOKEN_IDS:
        raise APIError(f"{prefix}stop_token_ids may have at most {MAX_STOP_TOKEN_IDS} entries",
                       param=prefix + "stop_token_ids")
    if _count(get("logit_bias")) > MAX_LOGIT_BIAS:
        raise APIError(f"{prefix}logit_bias may have at most {MAX_LOGIT_BIAS} entries", param=prefix + "logit_bias")


def _num_prompts(prompt) -> int:
    """Prompts in OpenAI's `prompt` or /generate's text / input_ids: a list of strings or of lists counts
    each; anything else is one prompt."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        return len(prompt)
    return 1


def check_caps(body) -> None:
    """400 for a parsed request body (completions, chat or /generate) beyond the caps of this module."""
    for field in ("prompt", "text", "input_ids"):
        prompt = getattr(body, field, None)
        if prompt is not None and _num_prompts(prompt) > MAX_PROMPTS:
            raise APIError(f"{field} holds {_num_prompts(prompt)} prompts; at most {MAX_PROMPTS} are accepted "
                           f"per call", param=field)
    messages = getattr(body, "messages", None)
    if messages is not None:
        if len(messages) > MAX_MESSAGES:
            raise APIError(f"messages has {len(messages)} entries; at most {MAX_MESSAGES} are accepted",
                           param="messages")
        for i, message in enumerate(messages):
            if message.role not in CHAT_ROLES:
                raise APIError(f"messages[{i}].role must be one of {list(CHAT_ROLES)}, got {message.role!r}",
                               param=f"messages.{i}.role")
    _check_sampling(body, "")
    raw = getattr(body, "sampling_params", None)
    if isinstance(raw, list):
        if len(raw) > MAX_PROMPTS:
            raise APIError(f"sampling_params holds {len(raw)} entries; at most {MAX_PROMPTS} are accepted",
                           param="sampling_params")
        for values in raw:
            _check_sampling(values, "sampling_params.")
    elif isinstance(raw, dict):
        _check_sampling(raw, "sampling_params.")
