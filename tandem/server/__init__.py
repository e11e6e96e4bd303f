"""HTTP server: OpenAI-compatible /v1/completions, /v1/chat/completions and /v1/models, plus the native
/generate, /health and /metrics (see docs/server.md). `create_app(engine)` builds the FastAPI app;
`tandem serve` runs it with uvicorn."""

from tandem.server.app import create_app

__all__ = ["create_app"]
