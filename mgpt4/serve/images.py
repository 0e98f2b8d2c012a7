"""Images named by ``image_url`` parts: base64 data URLs always; http(s) URLs and local files only when
the server allows them. Every way in is capped in bytes, and the decoded size is checked from the
header before any pixel is decoded, so a small file that inflates to gigapixels is refused.
"""

from __future__ import annotations

import base64
import binascii
import io
from pathlib import Path
from urllib.parse import unquote, urlsplit

import torch
from PIL import Image, UnidentifiedImageError

from mgpt4.download.fetch import FetchConfig, Fetcher, FetchError
from mgpt4.serve.config import ServeConfig
from mgpt4.serve.protocol import bad_request

# What browsers and the openai client send; PIL refuses to even probe other formats.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")
# PIL reports broken files as OSError, ValueError or SyntaxError (e.g. "broken PNG file").
_DECODE_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError)


class ImageLoader:
    """Turns image URLs into model-ready tensors, within one server's caps (thread-safe)."""

    def __init__(self, cfg: ServeConfig, transform) -> None:
        self.cfg = cfg
        self.transform = transform
        self.local_root = Path(cfg.allow_local_images).resolve() if cfg.allow_local_images else None
        self.fetcher = (
            Fetcher(
                FetchConfig(
                    timeout=cfg.remote_image_timeout_s,
                    max_bytes=cfg.max_image_bytes,
                    retries=0,
                    max_redirects=3,
                    user_agent="mgpt4-serve/0.1",
                )
            )
            if cfg.allow_remote_images
            else None
        )

    def load(self, url: str, param: str) -> torch.Tensor:
        """One image as a (3, H, W) tensor.

        Raises:
            ApiError: 400 naming ``param`` — refused source, too large, unreadable.
        """
        data = self._read_bytes(url.strip(), param)
        if len(data) > self.cfg.max_image_bytes:
            raise bad_request(
                f"{param}: image is {len(data)} bytes; this server accepts at most "
                f"{self.cfg.max_image_bytes}",
                param,
                "image_too_large",
            )
        return self._decode(data, param)

    def _read_bytes(self, url: str, param: str) -> bytes:
        scheme = urlsplit(url).scheme.lower() if "://" in url or url.startswith("data:") else ""
        if scheme == "data":
            return _data_url_bytes(url, param, self.cfg.max_image_bytes)
        if scheme in ("http", "https"):
            if self.fetcher is None:
                raise bad_request(
                    f"{param}: remote image URLs are disabled on this server; send the image as a base64 "
                    "data URL (or start the server with allow_remote_images)",
                    param,
                )
            try:
                return self.fetcher.fetch(url)
            except FetchError as exc:
                raise bad_request(f"{param}: could not fetch the image: {exc}", param) from exc
            finally:
                self.fetcher.close()
        if scheme in ("file", ""):
            return self._read_local(unquote(urlsplit(url).path) if scheme == "file" else url, param)
        raise bad_request(f"{param}: unsupported URL scheme '{scheme}'; use a data: URL", param)

    def _read_local(self, path: str, param: str) -> bytes:
        if self.local_root is None:
            raise bad_request(
                f"{param}: local image paths are disabled on this server; send a base64 data URL", param
            )
        file = (self.local_root / path).resolve()  # an absolute path replaces the root here
        if not file.is_relative_to(self.local_root):
            raise bad_request(f"{param}: {path} is outside the allowed image directory", param)
        if not file.is_file():
            raise bad_request(f"{param}: no such image file {path}", param)
        if file.stat().st_size > self.cfg.max_image_bytes:
            raise bad_request(
                f"{param}: image file is larger than {self.cfg.max_image_bytes} bytes",
                param,
                "image_too_large",
            )
        return file.read_bytes()

    def _decode(self, data: bytes, param: str) -> torch.Tensor:
        try:
            with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:
                width, height = image.size  # from the header: nothing decoded yet
                if width * height > self.cfg.max_image_pixels:
                    raise bad_request(
                        f"{param}: image is {width}x{height} pixels; this server accepts at most "
                        f"{self.cfg.max_image_pixels} pixels",
                        param,
                        "image_too_large",
                    )
                image.load()
                return self.transform(image)
        except Image.DecompressionBombError as exc:  # PIL's own limit, far above ours: header said so
            raise bad_request(f"{param}: {exc}", param, "image_too_large") from exc
        except _DECODE_ERRORS as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise bad_request(
                f"{param}: not a readable image ({', '.join(IMAGE_FORMATS)}): {reason}", param
            ) from exc


def _data_url_bytes(url: str, param: str, max_bytes: int) -> bytes:
    """``data:[<type>][;base64],<data>`` → bytes; only base64 image data is accepted."""
    header, comma, payload = url.partition(",")
    if not comma or not header.lower().endswith(";base64"):
        raise bad_request(f"{param}: expected a data URL like data:image/png;base64,...", param)
    media_type = header[len("data:") : -len(";base64")].lower()
    if media_type and not media_type.startswith("image/"):
        raise bad_request(f"{param}: data URL type {media_type} is not an image", param)
    if len(payload) > (max_bytes * 4) // 3 + 4:  # base64 is 4 characters per 3 bytes
        raise bad_request(
            f"{param}: image is larger than {max_bytes} bytes; this server accepts at most that",
            param,
            "image_too_large",
        )
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise bad_request(f"{param}: the data URL is not valid base64 ({exc})", param) from exc
