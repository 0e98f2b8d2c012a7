"""A real uvicorn server on a free loopback port serving a model, for the serve tests and others.

    with start_server(model, max_images=2) as running:
        running.chat([{"role": "user", "content": "hi"}])     # through the official openai client
        running.logs[-1]["batch_size"]                         # the JSON request-log lines

``start_server`` runs ``run_serve`` — the function ``mgpt4 serve`` calls — in a thread, and stops it
(waiting for it to return) on exit.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import openai

from mgpt4.model.minigpt4 import MiniGPT4
from mgpt4.serve import ServeConfig, run_serve


@dataclass
class Running:
    url: str
    client: openai.OpenAI
    logs: list[dict] = field(default_factory=list)  # JSON request-log lines, parsed

    def chat(self, messages, **params):
        """Greedy, 8 tokens unless told otherwise."""
        params.setdefault("temperature", 0)
        params.setdefault("max_tokens", 8)
        return self.client.chat.completions.create(model="micro", messages=messages, **params)


class _Capture(logging.Handler):
    def __init__(self, lines: list[dict]) -> None:
        super().__init__(logging.INFO)
        self.lines = lines

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(record.getMessage()))


@contextlib.contextmanager
def start_server(model: MiniGPT4, api_key: str = "unused", **overrides) -> Iterator[Running]:
    """Run ``run_serve`` on 127.0.0.1:0 in a thread; stop it (and wait for it) on exit."""
    cfg = ServeConfig(port=0, json=True, **overrides)
    ready = threading.Event()
    handles = []
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            run_serve(cfg, model, ready=lambda handle: (handles.append(handle), ready.set()))
        except BaseException as exc:  # reported to the test below
            errors.append(exc)
            ready.set()

    lines: list[dict] = []
    capture = _Capture(lines)
    request_log = logging.getLogger("mgpt4.serve.requests")
    request_log.addHandler(capture)
    request_log.setLevel(logging.INFO)
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        assert ready.wait(60), "the server did not start within 60 s"
        if errors:
            raise errors[0]
        handle = handles[0]
        client = openai.OpenAI(base_url=f"{handle.url}/v1", api_key=api_key, max_retries=0, timeout=120)
        yield Running(handle.url, client, lines)
    finally:
        if handles:
            handles[0].stop()
        thread.join(30)
        request_log.removeHandler(capture)
    assert not thread.is_alive(), "run_serve did not return after stop()"


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def image_message(text: str, url: str) -> dict:
    """A user message as the openai client sends text + image: content parts."""
    return {
        "role": "user",
        "content": [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": url}}],
    }
