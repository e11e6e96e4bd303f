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
from tandem.server.reasoning import REASONING_PARSERS
from tandem.server.tools.formats import TOOL_CALL_PARSERS

logger = logging.getLogger("tandem")
ENGINE_FAILED_EXIT_CODE = 1
WRITE_ERRORS_S = 5.0  # beyond the grace period: time for the ended requests' errors to be written


def add_parser(sub) -> None:
    parser = sub.add_parser(
        "serve", help="Serve the OpenAI-compatible HTTP API.",
        description="Serve a model over HTTP: /v1/completions, /v1/chat/completions, /v1/models, /generate, "
                    "/tokenize, /health, /metrics and SGLang's other endpoints (see docs/server.md).")
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
    _add_chat_flags(parser)
    parser.set_defaults(run=run)


def _add_chat_flags(parser) -> None:
    parser.add_argument("--tool-call-parser", choices=sorted(TOOL_CALL_PARSERS), default=None,
                        help="Parse tool calls out of chat answers in this format: qwen3_coder (Qwen3-Coder, "
                             "Qwen3.5) or hermes (Qwen2.5, Qwen3). Needed for `tools` (default: none).")
    parser.add_argument("--reasoning-parser", choices=sorted(REASONING_PARSERS), default=None,
                        help="Split <think>...</think> into reasoning_content: qwen3 (Qwen3, Qwen3.5; "
                             "default: none).")
    parser.add_argument("--chat-template", default=None,
                        help="A Jinja chat template file to use instead of the tokenizer's.")
    parser.add_argument("--enable-metrics", action="store_true",
                        help="Accepted for SGLang's launch scripts: /metrics is always served.")


class _StopRequested(BaseException):
    """Raised by SIGTERM while the model loads, so that started ranks are cleaned up."""


def _raise_stop(signum, frame):
    raise _StopRequested(signal.Signals(signum).name)


def _server_class():
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, except that a captured signal is not re-raised once the server has stopped:
        `run` returns normally, so the engine's shutdown (and its exit code 0) are ours. On the first
        signal, open requests get the grace period, then are ended with an error (`begin_shutdown`)."""

        def __init__(self, config, bridge, grace_s: float):
            super().__init__(config)
            self.bridge, self.grace_s = bridge, grace_s

        def handle_exit(self, sig, frame):
            if not self.should_exit:
                self.bridge.begin_shutdown(self.grace_s)
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

    return Server


def _serve(engine, args, limits, chat) -> int:
    """Serve `engine` until a signal, or until the engine gives up (exit code 1)."""
    import uvicorn

    from tandem.server import create_app

    app = create_app(engine, served_model_name=args.served_model_name, limits=limits, chat=chat)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level.lower(),
                            timeout_graceful_shutdown=args.graceful_shutdown_timeout + WRITE_ERRORS_S,
                            access_log=False)
    server = _server_class()(config, app.state.bridge, args.graceful_shutdown_timeout)
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


def run(args) -> int:
    from tandem.engine import Engine, run_worker_node

    if args.node_rank > 0:
        return run_worker_node(**engine_kwargs(args))

    from tandem.server.chat_prompt import ChatSettings, load_chat_template
    from tandem.server.limits import ServerLimits

    # settings first: a bad flag is an error before any rank starts
    limits = ServerLimits(api_key=args.api_key or None, max_queued_requests=args.max_queued_requests,
                          max_request_body=args.max_request_body)
    chat = ChatSettings(tool_call_parser=args.tool_call_parser, reasoning_parser=args.reasoning_parser,
                        chat_template=load_chat_template(args.chat_template))
    previous = signal.signal(signal.SIGTERM, _raise_stop)
    engine = None
    try:
        engine = Engine(**engine_kwargs(args))
        signal.signal(signal.SIGTERM, previous)
        return _serve(engine, args, limits, chat)
    except (_StopRequested, KeyboardInterrupt) as exc:
        logger.info("stopped while loading the model (%s)", exc or "SIGINT")
        return 130 if isinstance(exc, KeyboardInterrupt) else 143
    finally:
        signal.signal(signal.SIGTERM, previous)
        if engine is not None:
            engine.shutdown()
