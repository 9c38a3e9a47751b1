"""kiln serve: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over ``LLMEngine``.

``build_app(engine, ServerConfig(model_name=...))`` gives the ASGI app; ``ServerThread`` runs it on a free
127.0.0.1 port in the background; ``kiln serve`` (``kiln.llm.server.cli``) runs it in the foreground.
"""

from .app import ServerConfig, build_app
from .async_engine import AsyncEngine, EngineDeadError
from .launch import ServerThread, make_server

__all__ = ["AsyncEngine", "EngineDeadError", "ServerConfig", "ServerThread", "build_app", "make_server"]
