"""The FastAPI application: routes (openai_api, native_api), OpenAI-style errors and the engine's life.

`create_app(engine, limits=ServerLimits(...), chat=ChatSettings(...))` serves an already loaded `Engine`, using only its public
surface (see tandem.engine): at startup it records each stage's cache sizes for /metrics and starts the
engine's step thread; at shutdown it shuts the engine down (every rank process exits). `RequestGuard`
(tandem.server.limits) checks the API key and the body size before any route runs. Every error is
answered as OpenAI does, {"error": {"message", "type", "param", "code"}}: FastAPI's 422 validation errors
(wrong types, malformed JSON) and bad prompts (`PromptError`, naming the request field) become 400s."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tandem.prompts import PromptError
from tandem.server.bridge import EngineBridge
from tandem.server.chat_prompt import ChatSettings
from tandem.server.limits import RequestGuard, ServerLimits
from tandem.server.metrics import Metrics
from tandem.server.protocol import APIError

logger = logging.getLogger("tandem.server")


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        return f"the request body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}", None
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    message = first.get("msg", "invalid value")
    if "input" in first and first.get("type") != "missing":
        message += f" (got {first['input']!r})"[:200]
    more = f" (and {len(errors) - 1} more error(s))" if len(errors) > 1 else ""
    return (f"{param}: {message}{more}" if param else f"{message}{more}"), param


def _error_response(request: Request, error: APIError) -> JSONResponse:
    metrics: Metrics | None = getattr(request.app.state, "metrics", None)
    if metrics is not None and 400 <= error.status < 500:
        route = request.scope.get("route")  # the route's path: a client cannot mint new label values
        metrics.invalid.labels(getattr(route, "path", "other")).inc()
    return JSONResponse(error.body(), status_code=error.status, headers=getattr(error, "headers", None))


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return _error_response(request, exc)

    @app.exception_handler(PromptError)
    async def prompt_error(request: Request, exc: PromptError):
        return _error_response(request, APIError(str(exc), param=exc.field, code=exc.code))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return _error_response(request, APIError(message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return _error_response(request, APIError(str(exc.detail), status=exc.status_code, type=kind, code=code))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        logger.exception("error while serving %s", request.url.path)
        return _error_response(request, APIError(f"internal error: {exc}", status=500, type="server_error"))


def _lifespan(engine, bridge: EngineBridge, metrics: Metrics, name: str, shutdown_engine: bool):
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if not engine.loop_running and engine.health()[0]:
            metrics.set_stages(engine.stage_report())  # static cache sizes, read once
        engine.start_background_loop()
        logger.info("serving %s as %r", engine.model_path, name)
        try:
            yield
        finally:
            bridge.close()
            if shutdown_engine:
                logger.info("shutting down the engine")
                engine.shutdown()

    return lifespan


def server_settings(engine, name: str, chat: ChatSettings, limits: ServerLimits) -> dict:
    """What /get_server_info reports: the engine's arguments and the server's own (never the API key)."""
    args = getattr(engine, "args", None)
    args = dataclasses.asdict(args) if dataclasses.is_dataclass(args) else {}
    return {**args, "served_model_name": name, "tool_call_parser": chat.tool_call_parser,
            "reasoning_parser": chat.reasoning_parser, "chat_template": chat.chat_template is not None,
            "api_key": limits.api_key is not None, "max_queued_requests": limits.max_queued_requests,
            "max_request_body": limits.max_request_body}


def create_app(engine, served_model_name: str | None = None, shutdown_engine: bool = True,
               limits: ServerLimits | None = None, chat: ChatSettings | None = None) -> FastAPI:
    """An app serving `engine` within `limits` (default: no API key, the default bounds), with the chat
    options `chat` (tool-call and reasoning parsers, chat template; default none). The engine's step loop
    starts with the app; with `shutdown_engine` the engine is shut down when the app stops."""
    model_path = str(engine.model_path)
    name = served_model_name or Path(model_path).name or model_path
    limits, chat = limits or ServerLimits(), chat or ChatSettings()
    metrics = Metrics(model_name=name)
    bridge = EngineBridge(engine, metrics, limits)
    app = FastAPI(title="Tandem", lifespan=_lifespan(engine, bridge, metrics, name, shutdown_engine))
    app.add_middleware(RequestGuard, limits=limits, on_reject=lambda reason: metrics.rejected.labels(reason).inc())
    app.state.bridge, app.state.metrics, app.state.chat = bridge, metrics, chat
    app.state.served_model_name, app.state.model_path = name, model_path
    app.state.model_names = {name, model_path}
    app.state.created = int(time.time())
    app.state.server_info = server_settings(engine, name, chat, limits)
    _install_error_handlers(app)

    from tandem.server import chat_api, native_api, openai_api, server_api

    for module in (openai_api, chat_api, native_api, server_api):
        app.include_router(module.router)
    return app
