"""The bridge between the engine's step thread and the server's asyncio loop.

`EngineBridge.submit` wraps a prompt in a scheduler `Request` whose `on_update` runs on the engine's loop
thread: it records token timings for the metrics and wakes the HTTP handler through
`loop.call_soon_threadsafe` with the index of the request in an `asyncio.Queue` shared by the prompts of
one HTTP request. The handler then reads the request's live state (`output_ids` only grows, and
`finish_reason` is set after the last token), so no per-token copies cross threads.

The bridge also decides what a call may do and what its client sees: `admit` applies the queue bound
(429), `check_healthy` refuses calls once the engine has given up or the server is draining (503; calls
made while the ranks restart are queued, so their clients only wait), `failure` turns a request the
engine ended with a message into the error its client gets (500 for a numeric failure, 503 when the
engine failed or the server shut down), and `run_blocking` runs tokenization and chat templating on one
worker thread, off the event loop (as vLLM does). `wait_finished` returns as soon as a non-streaming
client disconnects, so that its requests are aborted at once.

`TextStream` (streamed text deltas of one request) lives in `tandem.server.detokenize`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from tandem.errors import ConfigError
from tandem.runtime.sampling.sampler import RAW_LOGITS_ERROR, SamplingParams
from tandem.runtime.scheduling.scheduler import Request
from tandem.server.detokenize import TextStream  # noqa: F401 (the endpoints import it from here)
from tandem.server.limits import QueueFullError, ServerLimits
from tandem.server.protocol import APIError
from tandem.server.sampling import config_error

logger = logging.getLogger("tandem.server")

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
                    self.metrics.first_token(now - self.arrival)
                else:
                    self.metrics.inter_token((now - self._last_token_time) / (n - self._seen), n - self._seen)
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


SHUTDOWN_MESSAGE = "the server is shutting down"
DISCONNECTED = -1  # put in a call's queue when its (non-streaming) client has gone


class EngineBridge:
    """The server's side of the engine: it uses only the engine's public surface (see tandem.engine)."""

    def __init__(self, engine, metrics=None, limits: ServerLimits | None = None):
        self.engine, self.metrics = engine, metrics
        self.limits = limits or ServerLimits()
        self.draining = False
        self._blocking = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tandem-tokenizer")

    @property
    def context_length(self) -> int:
        return self.engine.context_length

    def health(self) -> tuple[bool, str]:
        return self.engine.health()

    def check_healthy(self) -> None:
        """503 once the engine has given up or the server is shutting down. While the ranks are being
        restarted requests are still accepted: they wait in the queue."""
        if self.draining:
            raise APIError(SHUTDOWN_MESSAGE, status=503, type="server_error", code="server_shutting_down")
        if self.engine.error is not None:
            raise APIError(f"the engine is not running: {self.engine.error}", status=503, type="server_error",
                           code="engine_unavailable")

    def admit(self, count: int) -> None:
        """429 (with Retry-After) unless the waiting queue has room for `count` more requests."""
        bound = self.limits.max_queued_requests
        if not bound:
            return
        waiting = self.engine.queue_stats()[1]
        if waiting + count > bound:
            if self.metrics is not None:
                self.metrics.rejected.labels("queue_full").inc()
            raise QueueFullError(waiting, count, bound)

    async def run_blocking(self, fn, *args):
        """fn(*args) on the tokenizer thread (tokenization, chat templates), leaving the event loop free."""
        return await asyncio.get_running_loop().run_in_executor(self._blocking, fn, *args)

    def begin_shutdown(self, grace_s: float) -> threading.Timer:
        """Refuse new calls now; after `grace_s` seconds end every open request with a 503 / an error
        event (a daemon timer thread; returned so that a caller may cancel it)."""
        self.draining = True
        timer = threading.Timer(grace_s, self._end_open_requests)
        timer.daemon = True
        timer.start()
        return timer

    def _end_open_requests(self) -> None:
        with contextlib.suppress(Exception):  # the engine may already be shut down
            ended = self.engine.abort_all(SHUTDOWN_MESSAGE)
            if ended:
                logger.warning("ended %d open request(s): the shutdown grace period is over", ended)

    def close(self) -> None:
        self._blocking.shutdown(wait=False, cancel_futures=True)

    def submit(self, prompt_ids: list[int], params: SamplingParams, queue: asyncio.Queue, index: int = 0,
               input_logprobs: bool = False, endpoint: str = "generate", top_logprobs_num: int = 0,
               output_logprobs: bool = True) -> Tracked:
        self.check_healthy()
        req = Request(list(prompt_ids), params, input_logprobs_wanted=input_logprobs,
                      top_logprobs_num=top_logprobs_num, output_logprobs_wanted=output_logprobs)
        tracked = Tracked(req, index, queue, asyncio.get_running_loop(), self.metrics, endpoint)
        req.on_update = tracked.on_update
        try:
            self.engine.add_request(req)  # the one check of the params against the vocabulary
        except ConfigError as exc:
            raise config_error(exc, openai_names=endpoint != "generate") from None
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

    def token_texts(self, ids: list[int]) -> list[str]:
        return self.engine.token_texts(ids)

    def failure(self, req: Request) -> APIError | None:
        """The error its client gets for a request the engine ended (finish_reason abort with a message):
        503 when the engine gave up or the server is shutting down; for a numeric failure, 500 when the
        model's logits were not finite (as vLLM answers a request that finished with an error), 400 when
        the request's own sampling parameters made them invalid. None for any other request."""
        reason = req.finish_reason or {}
        if reason.get("type") != "abort":
            return None
        if self.engine.error is not None:
            return APIError(f"the engine failed: {self.engine.error}", status=503, type="server_error",
                            code="engine_unavailable")
        message = reason.get("message")
        if not message:
            return None  # aborted for its client, which has gone
        if message == SHUTDOWN_MESSAGE:
            return APIError(SHUTDOWN_MESSAGE, status=503, type="server_error", code="server_shutting_down")
        if message == RAW_LOGITS_ERROR:  # the model's own output: a server-side fault
            return APIError(f"generation failed: {message}", status=500, type="server_error",
                            code="generation_failed")
        # finite logits made invalid by the request's penalties, logit_bias or temperature
        return APIError(f"the request's sampling parameters made generation fail: {message}",
                        code="invalid_sampling_parameters")


async def _watch_disconnect(request, queue: asyncio.Queue) -> None:
    """Put DISCONNECTED in `queue` when the client of `request` (a starlette Request whose body has been
    read) disconnects."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    queue.put_nowait(DISCONNECTED)


async def wait_finished(trackeds: list[Tracked], queue: asyncio.Queue, request=None) -> bool:
    """Wait until every request finished: True, or False as soon as the client (a starlette Request) has
    gone."""
    watcher = asyncio.create_task(_watch_disconnect(request, queue)) if request is not None else None
    try:
        while not all(t.req.finished for t in trackeds):
            if await queue.get() == DISCONNECTED:
                return False
        return True
    finally:
        if watcher is not None:
            watcher.cancel()

