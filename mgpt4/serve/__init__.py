"""``mgpt4 serve``: an OpenAI-compatible chat endpoint with dynamic batching, and a chat page.

- ``config``: ``ServeConfig`` (address, API key, image sources, caps, batching, JSON logs).
- ``protocol``: OpenAI request models, error bodies, completion and SSE chunk builders.
- ``messages``: OpenAI messages → the official chat template; OpenAI sampling params → decoding.
- ``images``: data URLs / allowed URLs / allowed files → tensors, under byte and pixel caps.
- ``batcher``: concurrent requests decoded together, per-row stop, streaming fan-out, cancellation.
- ``app``: the FastAPI routes; ``server``: ``run_serve`` under uvicorn; ``static/``: the page at ``/``.

``ServeConfig`` imports without the server stack; ``create_app``, ``run_serve`` and ``ServeHandle``
need the ``serve`` extra and say how to install it when it is missing.
"""

from __future__ import annotations

from mgpt4.errors import UsageError
from mgpt4.serve.config import ServeConfig

__all__ = ["ServeConfig", "ServeHandle", "ServeResult", "create_app", "require_serve_extra", "run_serve"]

INSTALL_HINT = "pip install 'mgpt4[serve]'"


def require_serve_extra() -> None:
    """Raises UsageError with the install command when FastAPI or uvicorn is missing."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        message = f"mgpt4 serve needs the server extra ({exc.name or 'fastapi'} is missing): {INSTALL_HINT}"
        raise UsageError(message) from None


def __getattr__(name: str):
    if name in ("create_app", "run_serve", "ServeHandle", "ServeResult"):
        require_serve_extra()
        from mgpt4.serve import server

        return getattr(server, name)
    raise AttributeError(f"module 'mgpt4.serve' has no attribute {name!r}")
