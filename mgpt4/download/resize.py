"""Downloaded bytes → a resized RGB JPEG, or an ``ImageError`` saying why not.

Resize modes follow img2dataset's meaning so shards are interchangeable:

- ``border``: longest side → ``size``, then pad to ``size``×``size`` with white;
- ``center_crop``: shortest side → ``size``, then crop the centre square;
- ``keep_ratio``: shortest side → ``size``, aspect ratio kept, no crop;
- ``no``: no resize (still decoded, converted to RGB and re-encoded as JPEG).

Speed: for JPEG input the decoder is asked for a DCT-domain reduction (``Image.draft``) to the smallest
scale (1/2, 1/4, 1/8) still at least as large as the target, so a 1024 px photo bound for 224 px is
decoded at 256 px — several times less work than decoding it whole and then shrinking. Pillow releases
the GIL while decoding, resizing and encoding, so threads calling ``process_image`` run in parallel.

Memory: nothing is decoded before the header's pixel count passes ``max_pixels``; the bitmap's cost is
then estimated from the header (``decode_cost``, after the JPEG reduction) and reserved from the
process's ``DecodeBudget`` for as long as the image is being worked on. Each step frees the bitmap it
came from before the next one starts, so at most two full-size bitmaps (three for PA images) are alive.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import typing
import warnings
from dataclasses import dataclass
from typing import Literal

from PIL import Image, ImageOps, UnidentifiedImageError

from mgpt4.config import field
from mgpt4.download.decode_budget import DecodeBudget

ResizeMode = Literal["border", "center_crop", "keep_ratio", "no"]
RESIZE_MODES: tuple[str, ...] = typing.get_args(ResizeMode)


@dataclasses.dataclass
class ImageConfig:
    """How each downloaded image is stored (the download config's ``image`` section)."""

    size: int = field(224, doc="target size in pixels (the official recipe downloads at 224)")
    resize_mode: ResizeMode = field(
        "border", doc="border (fit, pad white), center_crop, keep_ratio (short side = size) or no"
    )
    jpeg_quality: int = field(95, doc="JPEG quality of stored images (img2dataset's default 95)")
    min_size: int = field(0, doc="drop images whose shorter side is below this many pixels")
    max_pixels: int = field(89_478_485, doc="drop images with more pixels than this (decompression bombs)")


# We check the pixel count ourselves from the header, before any decoding; Pillow's own warning
# (which it emits above 89 M pixels) would only repeat that on stderr from every worker thread.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

_EXIF_ORIENTATION = 0x0112
_ROTATED = (5, 6, 7, 8)  # EXIF orientations that swap width and height

# Peak bytes per decoded pixel while ``_render`` works on one image. Pillow stores every multi-band mode
# in 4 bytes per pixel (RGB too; 1 for L/P/1, 2 for I;16), and each step below keeps the bitmap it came
# from alive only until it has made the next: decoded + converted = 8 B, PA → RGBA → RGB on white = 12 B.
# Measured peak RSS per pixel of 4000×3000 images: PNG RGB 4, RGBA/LA 8, P 9, TIFF 4, GIF 5, BMP 4,
# JPEG 2000 6, AVIF 8.
_PEAK_BYTES_PER_PIXEL = 12
# A progressive JPEG keeps every DCT coefficient of the whole image while it decodes (libjpeg's
# full-image coefficient arrays: 2 bytes × up to 3 components per pixel), whatever scale it decodes at.
_PROGRESSIVE_JPEG_BYTES_PER_PIXEL = 6
# WebP decodes through libwebp's animation decoder, which keeps its own RGBA canvas and hands Pillow a
# copy of it: 8 bytes per pixel more (15 B/px measured for a 4000×3000 RGB WebP, 4 for the same PNG).
_WEBP_DECODER_BYTES_PER_PIXEL = 8


class ImageError(Exception):
    """An image that cannot be used; ``kind`` is a short machine-readable reason."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class ProcessedImage:
    """The JPEG to store, with the sizes img2dataset records."""

    jpeg: bytes
    width: int
    height: int
    original_width: int
    original_height: int


def process_image(
    data: bytes,
    size: int = 224,
    mode: ResizeMode = "border",
    quality: int = 95,
    min_size: int = 0,
    max_pixels: int = 89_478_485,
    budget: DecodeBudget | None = None,
) -> ProcessedImage:
    """Decode ``data``, resize it per ``mode`` and encode it as JPEG.

    Args:
        data: the downloaded body.
        size: target size in pixels (see the module docstring for each mode).
        mode: one of ``RESIZE_MODES``.
        quality: JPEG quality (1-100).
        min_size: reject images whose shorter side is smaller than this.
        max_pixels: reject images with more pixels than this before decoding (decompression bombs).
        budget: the process's decode budget; the image's ``decode_cost`` is reserved from it (waiting
            for room) before decoding starts and released when the JPEG is made. None: no limit.

    Raises:
        ImageError: kinds ``not_image``, ``decompression_bomb``, ``too_small``, ``truncated``,
            ``decode_error``.
    """
    img = _open(data, max_pixels)
    stored = img.size  # as stored, before any EXIF rotation
    if min(stored) < min_size:
        raise ImageError("too_small", f"image too small: {stored[0]}x{stored[1]} < {min_size} px")
    try:
        if img.format == "JPEG":  # its EXIF is in the header (a PNG's may follow the pixels: read later)
            orientation = _orientation(img)
            upright = _upright(stored, orientation)
            scaled = _scaled_size(*upright, size, mode)
            if scaled != upright:
                img.draft("RGB", scaled[::-1] if orientation in _ROTATED else scaled)
        cost = decode_cost(img, stored[0] * stored[1], _scaled_size(*stored, size, mode), size)
        with budget.reserve(cost) if budget is not None else contextlib.nullcontext():
            try:
                return _render(img, stored, size, mode, quality)
            finally:
                img.close()  # the bitmap is freed before the reservation is
    except Image.DecompressionBombError as exc:
        raise ImageError("decompression_bomb", f"decompression bomb: {exc}") from exc
    except OSError as exc:
        kind = "truncated" if "truncated" in str(exc) else "decode_error"
        raise ImageError(kind, f"cannot decode image: {exc}") from exc
    except (ValueError, SyntaxError, EOFError, IndexError, TypeError) as exc:
        raise ImageError("decode_error", f"cannot decode image: {exc}") from exc


def decode_cost(img: Image.Image, full_pixels: int, scaled: tuple[int, int], size: int) -> int:
    """Peak bytes that decoding, converting, resizing and encoding ``img`` may hold, from its header.

    Args:
        img: an opened, not yet loaded image (after any ``draft``, so its size is the decoded size).
        full_pixels: the pixel count its header declares (a progressive JPEG buffers all of them).
        scaled: the size the whole image is resized to (either orientation: only its area counts);
            ``size``: the target side (crop or pad square).
    """
    decoded = img.width * img.height
    output = scaled[0] * scaled[1] + size * size
    cost = (decoded + output) * _PEAK_BYTES_PER_PIXEL
    if img.format == "JPEG" and img.info.get("progressive"):
        cost += full_pixels * _PROGRESSIVE_JPEG_BYTES_PER_PIXEL
    elif img.format == "WEBP":
        cost += full_pixels * _WEBP_DECODER_BYTES_PER_PIXEL
    return cost


def _render(
    img: Image.Image, stored: tuple[int, int], size: int, mode: ResizeMode, quality: int
) -> ProcessedImage:
    """Decode → upright → RGB → resized → JPEG, closing each bitmap as soon as the next one exists."""
    img.load()
    orientation = _orientation(img)
    original = _upright(stored, orientation)
    scaled = _scaled_size(*original, size, mode)
    if orientation != 1:
        ImageOps.exif_transpose(img, in_place=True)
    rgb = _to_rgb(img)
    if rgb is not img:
        img.close()
    out = _resize(rgb, scaled, size, mode)
    if out is not rgb:
        rgb.close()
    buffer = io.BytesIO()
    out.save(buffer, "JPEG", quality=quality)
    return ProcessedImage(buffer.getvalue(), out.width, out.height, *original)


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """Read only the header; refuse bombs before a single pixel is decoded."""
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as exc:
        head = data[:16].decode("ascii", "replace").strip() or repr(data[:16])
        raise ImageError("not_image", f"not an image (body starts with {head!r})") from exc
    except Image.DecompressionBombError as exc:
        raise ImageError("decompression_bomb", f"decompression bomb: {exc}") from exc
    except (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError) as exc:
        raise ImageError("decode_error", f"cannot read image header: {exc}") from exc
    width, height = img.size
    if width <= 0 or height <= 0:
        raise ImageError("decode_error", f"image header says {width}x{height} pixels")
    if width * height > max_pixels:
        raise ImageError(
            "decompression_bomb",
            f"decompression bomb: {width}x{height} = {width * height} pixels > {max_pixels}",
        )
    return img


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation (1 = as stored). On a PNG not yet loaded this decodes it: call it after load."""
    try:
        return int(img.getexif().get(_EXIF_ORIENTATION, 1))
    except (OSError, ValueError, SyntaxError, TypeError, KeyError):
        return 1  # unreadable EXIF: keep the pixels as stored


def _upright(stored: tuple[int, int], orientation: int) -> tuple[int, int]:
    return (stored[1], stored[0]) if orientation in _ROTATED else stored


def _scaled_size(w: int, h: int, size: int, mode: ResizeMode) -> tuple[int, int]:
    """The size the whole image is resized to, before any crop or pad."""
    if mode == "no":
        return w, h
    side = max(w, h) if mode == "border" else min(w, h)
    scale = size / side
    return max(1, round(w * scale)), max(1, round(h * scale))


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB; transparency is flattened onto white (as img2dataset does), not onto black.

    Returns ``img`` itself when it is RGB already; otherwise a new image (``img`` is left to the caller).
    """
    if img.mode == "RGB":
        return img
    if (img.mode == "P" and "transparency" in img.info) or img.mode in ("PA", "RGBa", "La"):
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA"):
        # RGB accepts RGBA and LA pastes as they are, using their alpha as the mask: no RGBA copy needed.
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(img, mask=img)
        return background
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        img = ImageOps.autocontrast(img.convert("L")) if img.mode == "F" else img.convert("L")
    return img.convert("RGB")


def _resize(img: Image.Image, scaled: tuple[int, int], size: int, mode: ResizeMode) -> Image.Image:
    if mode == "no" or img.size == scaled and mode != "center_crop":
        return _pad(img, size) if mode == "border" else img
    # Shrinking: Pillow's bicubic widens its kernel with the scale factor (antialiased, like cv2's
    # INTER_AREA in quality); growing: Lanczos, as img2dataset's default upscale interpolation.
    resample = Image.Resampling.BICUBIC if img.width >= scaled[0] else Image.Resampling.LANCZOS
    if mode == "center_crop":
        # Crop in source coordinates first, so only the kept square is resampled.
        fx, fy = img.width / scaled[0], img.height / scaled[1]
        left, top = (scaled[0] - size) / 2 * fx, (scaled[1] - size) / 2 * fy
        box = (left, top, left + size * fx, top + size * fy)
        return img.resize((size, size), resample, box=box)
    img = img.resize(scaled, resample)
    return _pad(img, size) if mode == "border" else img


def _pad(img: Image.Image, size: int) -> Image.Image:
    if img.size == (size, size) or img.width > size or img.height > size:
        return img
    canvas = Image.new("RGB", (size, size), (255, 255, 255))
    canvas.paste(img, ((size - img.width) // 2, (size - img.height) // 2))
    return canvas
