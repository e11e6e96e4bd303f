"""The bridge between the engine's step thread and the server's asyncio loop.

`EngineBridge.submit` wraps a prompt in a scheduler `Request` whose `on_update` runs on the engine's loop
thread: it records token timings for the metrics and wakes the HTTP handler through
`loop.call_soon_threadsafe` with the index of the request in an `asyncio.Queue` shared by the prompts of
one HTTP request. The handler then reads the request's live state (`output_ids` only grows, and
`finish_reason` is set after the last token), so no per-token copies cross threads.

`TextStream` (streamed text deltas of one request) lives in `tandem.server.detokenize`."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time

from tandem.runtime.sampler import SamplingParams
from tandem.runtime.scheduler import Request
from tandem.server.detokenize import TextStream  # noqa: F401 (the endpoints import it from here)
from tandem.server.protocol import APIError


class Tracked:
    """One engine request as the server sees it."""

    def __init__(self, req: Request, index: int, queue: asyncio.Queue, loop: asyncio.AbstractEventLoop,
                 metrics, endpoint: str):
        self.req, self.index, self.queue, self.loop = req, index, queue, loop
        self.metrics, self.endpoint = metrics, endpoint
        self.arrival = time.monotonic()
        self.first_token_time: float | None = None
        self._last_token_time = self.arrival
        self._seen = 0
        self._done = False
        self._lock = threading.Lock()  # on_update runs on the loop thread, or on the caller's for aborts

    def on_update(self, req: Request) -> None:
        now = time.monotonic()
        with self._lock:
            n = len(req.output_ids)
            if n > self._seen and self.metrics is not None:
                if self._seen == 0:
                    self.first_token_time = now
                    self.metrics.ttft.observe(now - self.arrival)
                else:
                    gap = (now - self._last_token_time) / (n - self._seen)
                    for _ in range(n - self._seen):
                        self.metrics.itl.observe(gap)
                self._last_token_time = now
            self._seen = max(self._seen, n)
            finished_now = req.finished and not self._done
            if finished_now:
                self._done = True
                if self.metrics is not None:
                    self.metrics.request_finished(self, now)
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, self.index)
        except RuntimeError:  # the event loop is closed: the server is shutting down
            pass


class EngineBridge:
    """The server's side of the engine: it uses only the engine's public surface (see tandem.engine)."""

    def __init__(self, engine, metrics=None):
        self.engine, self.metrics = engine, metrics

    @property
    def context_length(self) -> int:
        return self.engine.context_length

    def health(self) -> tuple[bool, str]:
        return self.engine.health()

    def check_healthy(self) -> None:
        ok, reason = self.engine.health()
        if not ok:
            raise APIError(f"the engine is not running: {reason}", status=503, type="server_error",
                           code="engine_unavailable")

    def submit(self, prompt_ids: list[int], params: SamplingParams, queue: asyncio.Queue, index: int = 0,
               input_logprobs: bool = False, endpoint: str = "generate") -> Tracked:
        self.check_healthy()
        req = Request(list(prompt_ids), params, input_logprobs_wanted=input_logprobs)
        tracked = Tracked(req, index, queue, asyncio.get_running_loop(), self.metrics, endpoint)
        req.on_update = tracked.on_update
        try:
            self.engine.add_request(req)
        except ValueError as exc:
            raise APIError(str(exc)) from None
        except Exception as exc:
            raise APIError(f"the engine failed: {exc}", status=503, type="server_error",
                           code="engine_unavailable") from None
        if self.metrics is not None:
            self.metrics.request_started(tracked)
        return tracked

    def abort(self, tracked: Tracked) -> None:
        if not tracked.req.finished:
            with contextlib.suppress(Exception):
                self.engine.abort_request(tracked.req.rid)

    def text_of(self, req: Request) -> str:
        return self.engine.text_of(req)

    def decode(self, ids: list[int]) -> str:
        return self.engine.decode(ids)

    def failure(self, req: Request) -> APIError | None:
        """The error to report for a request the engine aborted because a rank failed."""
        if (req.finish_reason or {}).get("type") == "abort" and self.engine.error is not None:
            return APIError(f"the engine failed: {self.engine.error}", status=503, type="server_error",
                            code="engine_unavailable")
        return None


async def wait_finished(trackeds: list[Tracked], queue: asyncio.Queue, request=None, poll_s: float = 1.0) -> bool:
    """Wait until every request finished: True, or False as soon as the client (a starlette Request) has
    gone. NOTE: updates arrive with every token, so the client is checked by the clock, not on timeouts."""
    last_check = time.monotonic()
    while not all(t.req.finished for t in trackeds):
        try:
            await asyncio.wait_for(queue.get(), poll_s)
        except TimeoutError:
            pass
        if request is not None and time.monotonic() - last_check >= poll_s:
            last_check = time.monotonic()
            if await request.is_disconnected():
                return False
    return True
