"""Opening an image someone handed us: one function, one pixel cap, one error type.

Every image that ``describe``, ``chat``, ``curate``, the aligned-set reader and stage-1/2 training
decode goes through ``open_image`` (the downloader has its own resize path in ``download/resize.py``, with
the same default cap). The pixel count is read from the header and checked *before* a pixel is
decoded, so a small file that claims 20000×20000 pixels (a decompression bomb) costs nothing; an image
at the cap is ``MAX_IMAGE_PIXELS`` × 3 bytes ≈ 256 MiB as RGB (a 9400×9400 JPEG peaked at +347 MiB of
RSS decoded and transformed to 224 px, measured on CPU). describe, chat, curate and each training rank
decode one image at a time, so that is the bound per process. There is no JPEG draft (DCT-reduced)
decoding here: it would change the pixels the official preprocessing sees (PIL open →
``convert("RGB")`` → bicubic resize, MG ``blip_processors.py``).

Failures of any kind (missing, a folder, not an image, too many pixels, truncated, a plugin's own
exception) become one ``ImageReadError``, a ``DataError`` whose ``reason`` callers show per image.
"""

from __future__ import annotations

import io
import os
import re
import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from mgpt4.errors import DataError

# Pillow's own threshold (Image.MAX_IMAGE_PIXELS = 1024**3 // 4 // 3, about 0.25 GiB of RGB), which is
# also the downloader's default ``max_pixels`` in ``download/resize.py``. Pillow only *refuses* images
# over twice this and merely warns in between; we refuse everything over it.
MAX_IMAGE_PIXELS = 89_478_485

# Our check below runs first and refuses the same images, so Pillow's warning would only repeat it.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


class ImageReadError(DataError):
    """An image that cannot be used; ``reason`` is the message without the file name."""

    def __init__(self, name: str, detail: str) -> None:
        self.name = name
        self.reason = f"cannot read image ({detail})"
        super().__init__(f"{name}: {self.reason}")


def open_image(source: str | os.PathLike | bytes, name: str | None = None) -> Image.Image:
    """Decode an image file, or its encoded bytes, to an RGB ``PIL.Image`` (first frame).

    Args:
        source: a path, or the encoded bytes (e.g. a shard member).
        name: how errors name the image (default: the path, or "image bytes").

    Raises:
        ImageReadError: missing file, a folder, not an image, more than ``MAX_IMAGE_PIXELS`` pixels,
            or damaged data.
    """
    if isinstance(source, bytes | bytearray | memoryview):
        name = name or "image bytes"
        stream = io.BytesIO(source)
    else:
        name = name or str(source)
        path = Path(source)
        if path.is_dir():
            raise ImageReadError(name, "a folder, not an image file")
        try:
            stream = open(path, "rb")  # closed by the with below
        except OSError as exc:
            raise ImageReadError(name, exc.strerror or type(exc).__name__) from exc
    with stream:
        try:
            image = Image.open(stream)
            _check_pixels(image.size, name)
            image.load()
            return image if image.mode == "RGB" else image.convert("RGB")
        except ImageReadError:
            raise
        except UnidentifiedImageError as exc:
            raise ImageReadError(name, "not an image file Pillow can identify") from exc
        except Image.DecompressionBombError as exc:  # Pillow's own check (over 2 × its limit) ran first
            found = re.search(r"\((\d+) pixels\)", str(exc))
            raise ImageReadError(name, _too_large(f"{int(found[1]):,}" if found else "too many")) from exc
        except Exception as exc:  # Pillow's plugins raise many types on damaged data
            raise ImageReadError(name, _one_line(exc)) from exc


def _check_pixels(size: tuple[int, int], name: str) -> None:
    width, height = size
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageReadError(name, _too_large(f"{width}x{height} = {width * height:,}"))


def _too_large(pixels: str) -> str:
    return f"{pixels} pixels > the {MAX_IMAGE_PIXELS:,}-pixel limit (a decompression bomb?); downscale it"


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
