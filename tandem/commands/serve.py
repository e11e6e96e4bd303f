"""`tandem serve`: load the model on every rank, then serve the OpenAI-compatible HTTP API with uvicorn.

SIGTERM and SIGINT stop the server: new calls are refused, open requests get --graceful-shutdown-timeout
seconds to finish and are then ended with an error (503, or an error event in a stream), then the engine
shuts down and every rank process exits (exit code 0). If the engine gives up (its ranks kept failing, see
--max-rank-restarts), the server stops the same way and exits with code 1, naming the cause, so that a
supervisor restarts it. On nodes other than 0 (`--node-rank` > 0) it runs that node's ranks only."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading

from tandem.commands.engine_flags import add_engine_flags, engine_kwargs
from tandem.server.limits import DEFAULT_MAX_QUEUED_REQUESTS, DEFAULT_MAX_REQUEST_BODY

logger = logging.getLogger("tandem")
ENGINE_FAILED_EXIT_CODE = 1
WRITE_ERRORS_S = 5.0  # beyond the grace period: time for the ended requests' errors to be written


def add_parser(sub) -> None:
    parser = sub.add_parser(
        "serve", help="Serve the OpenAI-compatible HTTP API.",
        description="Serve a model over HTTP: /v1/completions, /v1/chat/completions, /v1/models, /generate, "
                    "/health and /metrics (see docs/server.md).")
    add_engine_flags(parser)
    parser.add_argument("--host", default="127.0.0.1", help="Address to listen on (default: 127.0.0.1).")
    parser.add_argument("--port", type=int, default=30000, help="Port to listen on (default: 30000).")
    parser.add_argument("--served-model-name", default=None,
                        help="Model name in the API (`model` field, /v1/models); default: the model "
                             "directory's name. The --model-path value is accepted too.")
    parser.add_argument("--graceful-shutdown-timeout", type=float, default=3.0,
                        help="Seconds open requests get to finish after SIGTERM/SIGINT before they are "
                             "ended with an error (default: 3).")
    parser.add_argument("--api-key", default=os.environ.get("TANDEM_API_KEY"),
                        help="Require `Authorization: Bearer <key>` on every endpoint but /health (default: "
                             "$TANDEM_API_KEY, else no key).")
    parser.add_argument("--max-queued-requests", type=int, default=DEFAULT_MAX_QUEUED_REQUESTS,
                        help="Requests that may wait for a cache slot; a call beyond it gets 429 with "
                             f"Retry-After; 0: no bound (default: {DEFAULT_MAX_QUEUED_REQUESTS}).")
    parser.add_argument("--max-request-body", type=int, default=DEFAULT_MAX_REQUEST_BODY,
                        help="Largest request body in bytes; a larger one gets 413 (default: "
                             f"{DEFAULT_MAX_REQUEST_BODY}).")
    parser.set_defaults(run=run)


class _StopRequested(BaseException):
    """Raised by SIGTERM while the model loads, so that started ranks are cleaned up."""


def _raise_stop(signum, frame):
    raise _StopRequested(signal.Signals(signum).name)


def run(args) -> int:
    from tandem.engine import Engine, run_worker_node

    if args.node_rank > 0:
        return run_worker_node(**engine_kwargs(args))

    import uvicorn

    from tandem.server import create_app
    from tandem.server.limits import ServerLimits

    class Server(uvicorn.Server):
        """uvicorn's server, except that a captured signal is not re-raised once the server has stopped:
        `run` returns normally, so the engine's shutdown (and its exit code 0) are ours. On the first
        signal, open requests get the grace period, then are ended with an error (`begin_shutdown`)."""

        def handle_exit(self, sig, frame):
            if not self.should_exit:
                app.state.bridge.begin_shutdown(args.graceful_shutdown_timeout)
            super().handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            handled = (signal.SIGINT, signal.SIGTERM)
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    limits = ServerLimits(api_key=args.api_key or None, max_queued_requests=args.max_queued_requests,
                          max_request_body=args.max_request_body)
    previous = signal.signal(signal.SIGTERM, _raise_stop)
    engine = None
    try:
        engine = Engine(**engine_kwargs(args))
        signal.signal(signal.SIGTERM, previous)
        app = create_app(engine, served_model_name=args.served_model_name, limits=limits)
        config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level.lower(),
                                timeout_graceful_shutdown=args.graceful_shutdown_timeout + WRITE_ERRORS_S,
                                access_log=False)
        server = Server(config)
        failed = []

        def stop_when_engine_fails():
            error = engine.wait_failed()
            if error is not None and not server.should_exit:
                failed.append(error)
                logger.error("the engine gave up, stopping the server: %s", error)
                server.should_exit = True

        threading.Thread(target=stop_when_engine_fails, name="tandem-engine-watch", daemon=True).start()
        server.run()
        if not server.started:
            logger.error("the server did not start (is port %d free?)", args.port)
            return 1
        if failed:
            logger.error("exiting with code %d: %s", ENGINE_FAILED_EXIT_CODE, failed[0])
            return ENGINE_FAILED_EXIT_CODE
        return 0
    except (_StopRequested, KeyboardInterrupt) as exc:
        logger.info("stopped while loading the model (%s)", exc or "SIGINT")
        return 130 if isinstance(exc, KeyboardInterrupt) else 143
    finally:
        signal.signal(signal.SIGTERM, previous)
        if engine is not None:
            engine.shutdown()
