"""`tandem serve`: load the model on every rank, then serve the OpenAI-compatible HTTP API with uvicorn.

SIGTERM and SIGINT stop the server: open streams get a short grace period, then the engine shuts down
and every rank process exits. On nodes other than 0 (`--node-rank` > 0) it runs that node's ranks only."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading

from tandem.commands.engine_flags import add_engine_flags, engine_kwargs

logger = logging.getLogger("tandem")


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
                             "aborted (default: 3).")
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

    class Server(uvicorn.Server):
        """uvicorn's server, except that a captured signal is not re-raised once the server has stopped:
        `run` returns normally, so the engine's shutdown (and its exit code 0) are ours."""

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

    previous = signal.signal(signal.SIGTERM, _raise_stop)
    engine = None
    try:
        engine = Engine(**engine_kwargs(args))
        signal.signal(signal.SIGTERM, previous)
        app = create_app(engine, served_model_name=args.served_model_name)
        config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level.lower(),
                                timeout_graceful_shutdown=args.graceful_shutdown_timeout, access_log=False)
        server = Server(config)
        server.run()
        if not server.started:
            logger.error("the server did not start (is port %d free?)", args.port)
            return 1
        return 0
    except (_StopRequested, KeyboardInterrupt) as exc:
        logger.info("stopped while loading the model (%s)", exc or "SIGINT")
        return 130 if isinstance(exc, KeyboardInterrupt) else 143
    finally:
        signal.signal(signal.SIGTERM, previous)
        if engine is not None:
            engine.shutdown()
