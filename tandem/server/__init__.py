"""HTTP server: OpenAI-compatible /v1/completions, /v1/chat/completions and /v1/models, plus the native
/generate, /health and /metrics (see docs/server.md). `create_app(engine)` builds the FastAPI app;
`tandem serve` runs it with uvicorn. (`create_app` is imported on first use, so that reading the server's
settings, e.g. `tandem.server.limits`, does not load FastAPI.)"""

__all__ = ["create_app"]


def __getattr__(name: str):
    if name == "create_app":
        from tandem.server.app import create_app

        return create_app
    raise AttributeError(f"module 'tandem.server' has no attribute {name!r}")
