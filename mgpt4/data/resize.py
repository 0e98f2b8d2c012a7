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
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Literal

from PIL import Image, ImageOps, UnidentifiedImageError

ResizeMode = Literal["border", "center_crop", "keep_ratio", "no"]
RESIZE_MODES: tuple[str, ...] = ("border", "center_crop", "keep_ratio", "no")

# We check the pixel count ourselves from the header, before any decoding; Pillow's own warning
# (which it emits above 89 M pixels) would only repeat that on stderr from every worker thread.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

_EXIF_ORIENTATION = 0x0112
_ROTATED = (5, 6, 7, 8)  # EXIF orientations that swap width and height


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
    mode: str = "border",
    quality: int = 95,
    min_size: int = 0,
    max_pixels: int = 89_478_485,
) -> ProcessedImage:
    """Decode ``data``, resize it per ``mode`` and encode it as JPEG.

    Args:
        data: the downloaded body.
        size: target size in pixels (see the module docstring for each mode).
        mode: one of ``RESIZE_MODES``.
        quality: JPEG quality (1-100).
        min_size: reject images whose shorter side is smaller than this.
        max_pixels: reject images with more pixels than this before decoding (decompression bombs).

    Raises:
        ImageError: kinds ``not_image``, ``decompression_bomb``, ``too_small``, ``truncated``,
            ``decode_error``.
    """
    img = _open(data, max_pixels)
    rotated = _orientation(img) in _ROTATED
    original_w, original_h = (img.height, img.width) if rotated else img.size
    if min(original_w, original_h) < min_size:
        raise ImageError("too_small", f"image too small: {original_w}x{original_h} < {min_size} px")
    scaled = _scaled_size(original_w, original_h, size, mode)
    try:
        if img.format == "JPEG" and scaled != (original_w, original_h):
            img.draft("RGB", (scaled[1], scaled[0]) if rotated else scaled)
        img.load()
        img = ImageOps.exif_transpose(img) or img
        img = _to_rgb(img)
        img = _resize(img, scaled, size, mode)
        out = io.BytesIO()
        img.save(out, "JPEG", quality=quality)
    except Image.DecompressionBombError as exc:
        raise ImageError("decompression_bomb", f"decompression bomb: {exc}") from exc
    except OSError as exc:
        kind = "truncated" if "truncated" in str(exc) else "decode_error"
        raise ImageError(kind, f"cannot decode image: {exc}") from exc
    except (ValueError, SyntaxError, EOFError, IndexError, TypeError) as exc:
        raise ImageError("decode_error", f"cannot decode image: {exc}") from exc
    return ProcessedImage(out.getvalue(), img.width, img.height, original_w, original_h)


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
    try:
        return int(img.getexif().get(_EXIF_ORIENTATION, 1))
    except (OSError, ValueError, SyntaxError, TypeError, KeyError):
        return 1  # unreadable EXIF: keep the pixels as stored


def _scaled_size(w: int, h: int, size: int, mode: str) -> tuple[int, int]:
    """The size the whole image is resized to, before any crop or pad."""
    if mode == "no":
        return w, h
    side = max(w, h) if mode == "border" else min(w, h)
    scale = size / side
    return max(1, round(w * scale)), max(1, round(h * scale))


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB; transparency is flattened onto white (as img2dataset does), not onto black."""
    if img.mode == "RGB":
        return img
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        img = ImageOps.autocontrast(img.convert("F").convert("L")) if img.mode == "F" else img.convert("L")
    return img.convert("RGB")


def _resize(img: Image.Image, scaled: tuple[int, int], size: int, mode: str) -> Image.Image:
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
