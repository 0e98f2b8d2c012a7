"""The OpenAI chat-completions wire format: request models, error bodies, response and chunk builders.

Requests are validated strictly (``"max_tokens": "5"`` is a 400, as it is at OpenAI) and unknown
fields are ignored, as OpenAI ignores them. Every failure becomes an ``ApiError`` whose body is
OpenAI's ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class ApiError(Exception):
    """An HTTP error answered with OpenAI's error body."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        kind: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.kind = kind or ("server_error" if status >= 500 else "invalid_request_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param, code)


class _Strict(BaseModel):
    # strict: no "5" → 5 coercion; extra="ignore": fields we do not know are dropped, as at OpenAI.
    model_config = ConfigDict(strict=True, extra="ignore")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImageUrl(_Strict):
    url: str
    detail: str | None = None  # OpenAI's low/high/auto; the model always sees 224×224


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageUrl


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatCompletionRequest(_Strict):
    """The fields of ``POST /v1/chat/completions`` that change what we do; others are ignored."""

    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None  # the newer name; wins over max_tokens
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    logprobs: bool | None = None


def parse_request(body: bytes) -> ChatCompletionRequest:
    """JSON bytes → a validated request.

    Raises:
        ApiError: 400 for malformed JSON or a missing / wrong-typed field, naming the field.
    """
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise bad_request(f"We could not parse the JSON body of your request: {exc}") from exc
    if not isinstance(data, dict):
        raise bad_request("The request body must be a JSON object")
    try:
        return ChatCompletionRequest.model_validate(data)
    except ValidationError as exc:
        # The deepest location is the most specific: for a union field, the member that got furthest.
        first = max(exc.errors(include_url=False), key=lambda error: len(error["loc"]))
        param = _param_name(first["loc"])
        raise bad_request(f"{param}: {first['msg']}", param=param) from exc


def _param_name(loc: tuple) -> str:
    """pydantic's error location as OpenAI names a parameter: ``messages[0].content``.

    Union members (``str``, ``list[...]``) and discriminator tags repeat in pydantic's path; they
    are dropped.
    """
    name = ""
    previous = None
    for part in loc:
        if isinstance(part, int):
            name += f"[{part}]"
        elif "[" in part or part in ("str", "int", "float", "bool", "none") or part == previous:
            continue
        else:
            name += f".{part}" if name else part
        previous = part
    return name or "body"


# --------------------------------------------------------------------------------------------------
# responses
# --------------------------------------------------------------------------------------------------


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion(
    request_id: str, model: str, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int
) -> dict[str, Any]:
    """A ``chat.completion`` object with one choice."""
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": None,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        ],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def chunk(
    request_id: str,
    model: str,
    delta: dict[str, Any] | None,
    finish_reason: str | None = None,
    usage_data: dict[str, int] | None = None,
) -> str:
    """One server-sent event holding a ``chat.completion.chunk``; ``delta=None`` gives the usage chunk."""
    data: dict[str, Any] = {
        "id": request_id,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": None,
        "choices": []
        if delta is None
        else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
    }
    if usage_data is not None:
        data["usage"] = usage_data
    return sse(data)


def sse(data: dict[str, Any] | str) -> str:
    """``data: …`` plus the blank line that ends an event."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n"


DONE_EVENT = "data: [DONE]\n\n"
