"""The FastAPI app: ``POST /v1/chat/completions``, ``GET /v1/models``, ``GET /health`` and the page at ``/``.

    app = create_app(model, ServeConfig())      # then any ASGI server; ``run_serve`` uses uvicorn

Request life: auth → body read under the byte cap → strict parse → messages to the official chat
prompt → length checks → images decoded (worker threads) → a ``Job`` for the batcher → a JSON
answer, or SSE chunks as the rows decode. A client that goes away cancels its job: a waiting job
leaves the queue, a decoding row stops at the next step.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import hmac
import json
import logging
import time
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from mgpt4.model.minigpt4 import MiniGPT4
from mgpt4.model.vision import image_transform
from mgpt4.serve import protocol
from mgpt4.serve.batcher import Batcher, Event, Job
from mgpt4.serve.config import ServeConfig
from mgpt4.serve.images import ImageLoader
from mgpt4.serve.messages import build_chat_prompt, decoding_from_request, prompt_length
from mgpt4.serve.protocol import ApiError, bad_request

log = logging.getLogger("mgpt4.serve")
request_log = logging.getLogger("mgpt4.serve.requests")

OFFICIAL_MAX_LENGTH = 2000  # MG conversation.py answer_prepare(max_length=2000)
DISCONNECTED = Event("disconnected")  # queued by the watcher when the client goes away


class _Service:
    """Everything a request needs: the model's facts, the batcher, the image loader, the caps."""

    def __init__(self, model: MiniGPT4, cfg: ServeConfig) -> None:
        self.cfg = cfg
        self.model = model
        self.api_key = cfg.resolved_api_key()
        default_name = Path(cfg.checkpoint).name if cfg.checkpoint else model.preset.name
        self.model_name = cfg.model_name or default_name
        self.created = int(time.time())
        positions = model.llama_model.config.max_position_embeddings
        self.context_length = cfg.context_length or min(OFFICIAL_MAX_LENGTH, positions)
        room = self.context_length - 1  # at least one token must fit after the prompt
        self.max_prompt_tokens = min(cfg.max_prompt_tokens or room, room)
        # The worker thread decodes with model.tokenizer; a Rust tokenizer must not be used from two
        # threads at once, so prompt lengths are counted with a copy on the event loop.
        self.tokenizer = copy.deepcopy(model.tokenizer)
        self.images = ImageLoader(cfg, image_transform(model.preset.vision.image_size))
        self.background: set[asyncio.Task] = set()
        self.batcher = Batcher(
            model, cfg.max_batch_size, cfg.batch_wait_ms, cfg.repetition_penalty, cfg.max_queue
        )

    def check_auth(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        valid = hmac.compare_digest(token.strip().encode(), self.api_key.encode())  # constant time
        if scheme.lower() != "bearer" or not valid:
            raise ApiError(
                401,
                "Incorrect or missing API key: send 'Authorization: Bearer YOUR_KEY'",
                code="invalid_api_key",
            )


def create_app(model: MiniGPT4, cfg: ServeConfig) -> FastAPI:
    """The ASGI app serving ``model`` under ``cfg``'s caps; its batcher runs while the app runs.

    Raises:
        ConfigError: a cap in ``cfg`` makes no sense.
    """
    cfg.validate()
    service = _Service(model, cfg)

    async def lifespan(app: FastAPI):
        service.batcher.start()
        yield
        service.batcher.stop()

    app = FastAPI(title="mgpt4 serve", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.service = service
    _add_error_handlers(app)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": service.model_name}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        service.check_auth(request)
        entry = {"id": service.model_name, "object": "model", "created": service.created, "owned_by": "mgpt4"}
        return {"object": "list", "data": [entry]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        start = time.monotonic()
        try:
            service.check_auth(request)
            body = await _read_body(request, cfg.max_body_bytes)
            job, include_usage, stream = await _prepare(service, body)
        except ApiError as exc:
            _log_request(cfg, {"status": exc.status, "error": exc.message, "latency_s": _since(start)})
            raise
        except ClientDisconnect:
            return Response(status_code=499)  # nobody is listening any more
        if not service.batcher.submit(job):
            _log_request(cfg, {"status": 429, "error": "queue full", "latency_s": _since(start)})
            raise ApiError(429, "The server is busy; retry shortly", code="rate_limit_exceeded")
        watcher = asyncio.create_task(_watch_disconnect(request, job))
        if stream:
            return StreamingResponse(
                _stream(service, job, include_usage, watcher, start),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        return await _answer(service, job, watcher, start)

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse((resources.files("mgpt4.serve") / "static" / "index.html").read_text("utf-8"))

    return app


# --------------------------------------------------------------------------------------------------
# request → job
# --------------------------------------------------------------------------------------------------


async def _read_body(request: Request, cap: int) -> bytes:
    too_large = ApiError(
        413, f"Request body is larger than this server's limit of {cap} bytes", code="request_too_large"
    )
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > cap:
        raise too_large
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > cap:
            raise too_large
    return bytes(body)


async def _prepare(service: _Service, body: bytes) -> tuple[Job, bool, bool]:
    cfg, model = service.cfg, service.model
    parsed = protocol.parse_request(body)
    decoding = decoding_from_request(parsed, cfg)
    chat = build_chat_prompt(parsed.messages, model.preset.chat_style, cfg.max_images)
    prompt_tokens = prompt_length(service.tokenizer, chat.prompt, model.preset.num_image_tokens)
    context = service.context_length
    if prompt_tokens > service.max_prompt_tokens:
        raise bad_request(
            f"The messages take {prompt_tokens} tokens (images included); this server accepts at most "
            f"{service.max_prompt_tokens}. Shorten the conversation.",
            "messages",
            "context_length_exceeded",
        )
    max_tokens = decoding.max_tokens
    if max_tokens is None:
        max_tokens = min(cfg.default_max_tokens, cfg.max_tokens, context - prompt_tokens)
    elif prompt_tokens + max_tokens > context:
        raise bad_request(
            f"This model's maximum context length is {context} tokens. However, you requested "
            f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the messages, {max_tokens} in the "
            "completion). Please reduce the length of the messages or completion.",
            "messages",
            "context_length_exceeded",
        )
    tensors = [
        await asyncio.to_thread(service.images.load, url, param)
        for url, param in zip(chat.image_urls, chat.image_params, strict=True)
    ]
    size = model.preset.vision.image_size
    images = torch.stack(tensors) if tensors else torch.zeros(0, 3, size, size)
    job = Job(
        request_id=protocol.completion_id(),
        prompt=chat.prompt,
        images=images,  # (k, 3, H, W)
        prompt_tokens=prompt_tokens,
        decoding=dataclasses.replace(decoding, max_tokens=max_tokens),
        loop=asyncio.get_running_loop(),
        stream=parsed.stream,
    )
    include_usage = bool(parsed.stream_options and parsed.stream_options.include_usage)
    return job, include_usage, parsed.stream


# --------------------------------------------------------------------------------------------------
# job → response
# --------------------------------------------------------------------------------------------------


async def _watch_disconnect(request: Request, job: Job) -> None:
    """Put ``DISCONNECTED`` in the job's queue once the client has gone away.

    The body was read already, so a disconnect is all that can arrive. The job's reader sees it in
    order with the job's own events, so no event is lost between two readers.
    """
    while (await request.receive())["type"] != "http.disconnect":
        pass
    job.queue.put_nowait(DISCONNECTED)


def _abandon(service: _Service, job: Job, start: float) -> None:
    """The client left before the answer ended: free the job's queue place or batch row, log it.

    Called by the job's only reader, which stops reading; a background task then reads the job's
    last event (how many tokens its row made before it stopped) and logs the request.
    """
    if service.batcher.cancel(job):
        _log_job(service.cfg, job, start, 499, "cancelled", 0)
        return
    task = asyncio.get_running_loop().create_task(_log_when_row_stops(service, job, start))
    service.background.add(task)  # asyncio keeps only weak references to tasks
    task.add_done_callback(service.background.discard)


async def _log_when_row_stops(service: _Service, job: Job, start: float) -> None:
    while (event := await job.queue.get()).kind in ("delta", DISCONNECTED.kind):
        pass
    _log_job(service.cfg, job, start, 499, event.finish_reason or "cancelled", event.completion_tokens)


async def _answer(service: _Service, job: Job, watcher: asyncio.Task, start: float) -> Response:
    try:
        event = await job.queue.get()  # a non-streaming job gets no deltas: done, error or DISCONNECTED
    finally:
        watcher.cancel()
    if event is DISCONNECTED:
        _abandon(service, job, start)
        return Response(status_code=499)  # nobody reads it; 499 is nginx's "client closed request"
    if event.kind == "error":
        _log_job(service.cfg, job, start, 500, None, 0, event.text)
        raise ApiError(500, event.text)
    _log_job(service.cfg, job, start, 200, event.finish_reason, event.completion_tokens)
    answer = protocol.completion(
        job.request_id, service.model_name, event.text, event.finish_reason, job.prompt_tokens,
        event.completion_tokens,
    )  # fmt: skip
    return JSONResponse(answer)


async def _stream(service: _Service, job: Job, include_usage: bool, watcher: asyncio.Task, start: float):
    """SSE chunks in OpenAI's order: role, content deltas, finish reason, [usage], ``[DONE]``."""
    name, request_id = service.model_name, job.request_id
    final: Event | None = None
    try:
        yield protocol.chunk(request_id, name, {"role": "assistant", "content": ""})
        while final is None:
            event = await job.queue.get()
            if event is DISCONNECTED:
                return  # `finally` frees its row
            if event.kind == "delta":
                yield protocol.chunk(request_id, name, {"content": event.text})
                continue
            final = event
            if event.kind == "error":
                yield protocol.sse(ApiError(500, event.text).body())
                continue
            yield protocol.chunk(request_id, name, {}, finish_reason=event.finish_reason)
            if include_usage:
                tokens = protocol.usage(job.prompt_tokens, event.completion_tokens)
                yield protocol.chunk(request_id, name, None, usage_data=tokens)
        yield protocol.DONE_EVENT
    finally:
        # Runs when the stream ends, and when the server cancels it because the client left.
        watcher.cancel()
        if final is None:
            _abandon(service, job, start)
        elif final.kind == "done":
            _log_job(service.cfg, job, start, 200, final.finish_reason, final.completion_tokens)
        else:
            _log_job(service.cfg, job, start, 500, None, 0, final.text)


# --------------------------------------------------------------------------------------------------
# errors and logs
# --------------------------------------------------------------------------------------------------


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else None
        error = ApiError(exc.status_code, str(exc.detail), code=code)
        return JSONResponse(error.body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error on %s: %s: %s", request.url.path, type(exc).__name__, exc)
        return JSONResponse(ApiError(500, "Internal server error").body(), status_code=500)


def _since(start: float) -> float:
    return round(time.monotonic() - start, 4)


def _log_job(
    cfg: ServeConfig,
    job: Job,
    start: float,
    status: int,
    finish_reason: str | None,
    completion_tokens: int,
    error: str | None = None,
) -> None:
    record = {
        "id": job.request_id,
        "status": status,
        "stream": job.stream,
        "latency_s": _since(start),
        "queue_s": round(job.started - job.enqueued, 4) if job.started else None,
        "prompt_tokens": job.prompt_tokens,
        "completion_tokens": completion_tokens,
        "images": len(job.images),
        "batch_size": job.batch_size,
        "finish_reason": finish_reason,
    }
    if error:
        record["error"] = error
    _log_request(cfg, record)


def _log_request(cfg: ServeConfig, record: dict[str, Any]) -> None:
    """One JSON line per chat-completion request on the ``mgpt4.serve.requests`` logger (with ``json``)."""
    if cfg.json:
        request_log.info(json.dumps({"event": "chat.completion", **record}, ensure_ascii=False))
