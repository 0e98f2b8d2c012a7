"""``run_serve``: load the model, build the app, and run it under uvicorn until stopped.

run_serve(ServeConfig(checkpoint="runs/stage2", port=8000))           # blocks; Ctrl-C stops it
run_serve(cfg, model, ready=lambda handle: print(handle.url))          # tests: port=0, handle.stop()
"""

from __future__ import annotations

import dataclasses
import logging
import socket
from collections.abc import Callable

import uvicorn

from mgpt4.errors import UsageError
from mgpt4.infer.loading import load_model
from mgpt4.model.minigpt4 import MiniGPT4
from mgpt4.serve.app import create_app
from mgpt4.serve.config import ServeConfig

log = logging.getLogger("mgpt4.serve")


@dataclasses.dataclass
class ServeHandle:
    """A running server: where it listens, and how to stop it from another thread."""

    url: str
    host: str
    port: int
    _server: uvicorn.Server

    def stop(self) -> None:
        """Ask the server to finish its open requests and return from ``run_serve``."""
        self._server.should_exit = True


@dataclasses.dataclass
class ServeResult:
    """What a finished ``run_serve`` reports."""

    url: str
    batches: int


class _Server(uvicorn.Server):
    """uvicorn's server, telling ``ready`` once its socket accepts connections."""

    def __init__(self, config: uvicorn.Config, on_started: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_started = on_started

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started:
            self._on_started()


def run_serve(
    cfg: ServeConfig, model: MiniGPT4 | None = None, ready: Callable[[ServeHandle], None] | None = None
) -> ServeResult:
    """Serve ``model`` (or the one ``cfg`` names) until stopped (Ctrl-C, SIGTERM or ``handle.stop()``).

    Args:
        cfg: address, caps, batching, logging; ``cfg.checkpoint``/``cfg.model`` when ``model`` is None.
        model: an already loaded model (eval mode), e.g. in tests or ``demo``.
        ready: called with a ``ServeHandle`` once the server accepts connections (from its thread).

    Raises:
        UsageError: the address cannot be bound; ConfigError: a bad cap; CheckpointError: bad weights.
    """
    cfg.validate()
    if model is None:
        model = load_model(cfg.model, cfg.checkpoint, cfg.device)
    app = create_app(model, cfg)
    sock = _bind(cfg.host, cfg.port)
    host, port = sock.getsockname()[:2]
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    config = uvicorn.Config(app, log_config=None, access_log=not cfg.json, timeout_graceful_shutdown=5)
    server: _Server

    def started() -> None:
        log.info("serving %s at %s (OpenAI API under %s/v1)", app.state.service.model_name, url, url)
        if ready is not None:
            ready(ServeHandle(url, host, port, server))

    server = _Server(config, started)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        # uvicorn finished the open requests on Ctrl-C, then re-raised it: that is how a server stops.
        pass
    finally:
        sock.close()
    return ServeResult(url, app.state.service.batcher.batches)


def _bind(host: str, port: int) -> socket.socket:
    """Bind the listening socket ourselves, so ``port=0`` gives a free port we can report."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        reason = exc.strerror or exc
        raise UsageError(f"serve: cannot listen on {host}:{port} ({reason}); pick another port") from exc
    return sock
