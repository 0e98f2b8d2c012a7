"""``ServeConfig``: what ``mgpt4 serve`` binds to, which model it serves, and every request cap.

Importable without the ``serve`` extra, so the CLI can build its options from these fields.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from mgpt4.config import ModelConfig, field
from mgpt4.errors import ConfigError

API_KEY_ENV = "MGPT4_API_KEY"
MiB = 1 << 20


@dataclasses.dataclass
class ServeConfig:
    """``mgpt4 serve``: an OpenAI-compatible endpoint, its caps, batching and logging."""

    checkpoint: str | None = field(None, doc="run directory or checkpoint folder; None = build `model`")
    model: ModelConfig = field(default_factory=ModelConfig, doc="preset and official weights (no checkpoint)")
    device: str = field("auto", doc="auto (cuda when present), cpu, cuda, cuda:N")
    model_name: str | None = field(
        None, doc="model id in /v1/models and responses; None = the checkpoint folder or preset name"
    )
    host: str = field("127.0.0.1", doc="address to bind; 127.0.0.1 keeps the server private to this machine")
    port: int = field(8000, doc="TCP port (0 = any free port)")
    api_key: str | None = field(
        None, doc=f"require `Authorization: Bearer KEY` on /v1/* (also read from ${API_KEY_ENV})"
    )
    allow_remote_images: bool = field(False, doc="fetch http(s) image URLs (off: the server fetches nothing)")
    remote_image_timeout_s: float = field(10.0, doc="deadline for one remote image fetch, seconds")
    allow_local_images: str | None = field(
        None, doc="serve image paths and file:// URLs from inside this directory only (None = refuse all)"
    )
    max_body_bytes: int = field(16 * MiB, doc="largest request body; larger ones get 413")
    max_image_bytes: int = field(8 * MiB, doc="largest encoded image (data URL, file or download)")
    max_image_pixels: int = field(
        4096 * 4096, doc="largest decoded image (width × height); refuses decompression bombs"
    )
    max_images: int = field(4, doc="images per request at most")
    max_prompt_tokens: int | None = field(
        None, doc="prompt length cap in LLM positions (images count); None = the model's context"
    )
    context_length: int | None = field(
        None, doc="prompt + completion limit; None = min(official max_length 2000, the LLM's positions)"
    )
    max_tokens: int = field(1024, doc="largest max_tokens a request may ask for")
    default_max_tokens: int = field(
        300, doc="max_tokens when a request gives none (official 300; never above max_tokens)"
    )
    default_temperature: float = field(
        1.0, doc="temperature when a request gives none (official demo samples at 1.0; 0 = greedy)"
    )
    default_top_p: float = field(0.9, doc="top_p when a request gives none (official demo 0.9)")
    repetition_penalty: float = field(1.05, doc="penalty on generated tokens (official demo 1.05)")
    max_batch_size: int = field(8, doc="requests decoded together in one generate call at most")
    batch_wait_ms: float = field(
        50.0, doc="under concurrent load, how long a batch waits for more requests before it starts"
    )
    max_queue: int = field(256, doc="requests waiting or running at most; more get 429")
    json: bool = field(False, doc="log one JSON line per request (latency, tokens, batch size)")

    def validate(self) -> None:
        """Raises ConfigError naming the field when a cap or size makes no sense."""
        positive = (
            "max_body_bytes", "max_image_bytes", "max_image_pixels", "max_tokens", "default_max_tokens",
            "max_batch_size", "max_queue", "remote_image_timeout_s", "default_top_p", "repetition_penalty",
        )  # fmt: skip
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"serve.{name}: must be > 0, got {getattr(self, name)}")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"serve.port: must be 0..65535, got {self.port}")
        if self.max_images < 0 or self.batch_wait_ms < 0:
            raise ConfigError("serve.max_images and serve.batch_wait_ms must be >= 0")
        if not 0 <= self.default_temperature <= 2 or self.default_top_p > 1:
            raise ConfigError("serve.default_temperature must be in [0, 2] and default_top_p in (0, 1]")
        if self.allow_local_images is not None and not Path(self.allow_local_images).is_dir():
            raise ConfigError(f"serve.allow_local_images: {self.allow_local_images} is not a directory")

    def resolved_api_key(self) -> str | None:
        """The key clients must send: ``api_key``, else ``$MGPT4_API_KEY``, else none (open)."""
        return self.api_key or os.environ.get(API_KEY_ENV) or None
