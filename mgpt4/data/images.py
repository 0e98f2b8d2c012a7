"""Images someone handed us: where they are (one source, one suffix list) and how they open (one cap).

**Finding them** — ``iter_sources`` is the one reader of image inputs for ``describe``, ``curate`` and
``eval``: image files, folders (recursive, sorted, hidden files left out), globs (``**`` recurses),
``.tar`` shards, folders of shards and WebDataset brace patterns (``{00000..00009}.tar``), with one
suffix list (``IMAGE_SUFFIXES``, also the shard members training reads). Every input yields one
``SourceImage`` per image, in order; one that cannot be read carries its reason (``error``) instead of
stopping the rest. Shard members are named ``SHARD#KEY``.

**Opening them** — every image that ``describe``, ``chat``, ``curate``, ``eval``, the aligned-set reader
and stage-1/2 training decode goes through ``open_image`` (the downloader has its own resize path in
``download/resize.py``, with the same default cap). The pixel count is read from the header and checked
*before* a pixel is decoded, so a small file that claims 20000×20000 pixels (a decompression bomb) costs
nothing; an image at the cap is ``MAX_IMAGE_PIXELS`` × 3 bytes ≈ 256 MiB as RGB (a 9400×9400 JPEG peaked
at +347 MiB of RSS decoded and transformed to 224 px, measured on CPU). describe, chat, curate and each
training rank decode one image at a time, so that is the bound per process. There is no JPEG draft
(DCT-reduced) decoding here: it would change the pixels the official preprocessing sees (PIL open →
``convert("RGB")`` → bicubic resize, MG ``blip_processors.py``).

Failures of any kind (missing, a folder, not an image, too many pixels, truncated, a plugin's own
exception) become one ``ImageReadError``, a ``DataError`` whose ``reason`` callers show per image.
"""

from __future__ import annotations

import dataclasses
import glob
import io
import os
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from mgpt4.errors import DataError

# Pillow's own threshold (Image.MAX_IMAGE_PIXELS = 1024**3 // 4 // 3, about 0.25 GiB of RGB), which is
# also the downloader's default ``max_pixels`` in ``download/resize.py``. Pillow only *refuses* images
# over twice this and merely warns in between; we refuse everything over it.
MAX_IMAGE_PIXELS = 89_478_485

# The one list of image file types: describe, curate, eval and the shard readers (members KEY.jpg …).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
SHARD_SUFFIX = ".tar"

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


# --------------------------------------------------------------------------------------------------
# Finding images: files, folders, globs, shards
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class SourceImage:
    """One image input: its name, how to read its encoded bytes, or why it cannot be read.

    ``name`` is the path as given (or found in a folder), or ``SHARD#KEY`` for a shard member;
    ``path`` is set for files, ``shard``/``key`` for shard members (``key`` is "" when ``error`` is
    about the whole shard).
    """

    name: str
    read: Callable[[], bytes] | None = None
    error: str | None = None
    path: Path | None = None
    shard: str | None = None
    key: str | None = None

    def read_bytes(self) -> bytes:
        """The encoded image.

        Raises:
            ImageReadError: the input has an ``error``, or the file cannot be read (any more).
        """
        if self.error is not None or self.read is None:
            raise ImageReadError(self.name, self.error or "nothing to read")
        try:
            return self.read()
        except OSError as exc:  # deleted or made unreadable since it was listed
            raise ImageReadError(self.name, exc.strerror or type(exc).__name__) from exc

    def open(self) -> Image.Image:
        """Decode as RGB under the pixel cap (``open_image``); raises ``ImageReadError``."""
        if self.path is not None and self.error is None:
            return open_image(self.path, self.name)
        return open_image(self.read_bytes(), self.name)


def is_image_file(path: str | os.PathLike) -> bool:
    """A file whose suffix is one of ``IMAGE_SUFFIXES`` (case-insensitive)."""
    return Path(path).suffix.lower() in IMAGE_SUFFIXES and Path(path).is_file()


def image_files(folder: str | os.PathLike) -> list[Path]:
    """Image files under ``folder``, recursively, sorted; hidden files (``.x.jpg``, OS droppings) left out."""
    return sorted(
        p for p in Path(folder).rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file()
    )  # fmt: skip


def has_shards(folder: str | os.PathLike) -> bool:
    """A folder holding ``.tar`` files is (also) a shard set."""
    return Path(folder).is_dir() and any(Path(folder).glob(f"*{SHARD_SUFFIX}"))


def is_shard_spec(spec: str) -> bool:
    """A ``.tar`` file, a brace pattern (``{00000..00009}.tar``) or a folder of shards."""
    return spec.endswith(SHARD_SUFFIX) or _is_brace(spec) or has_shards(spec)


def expand_inputs(specs: Sequence[str]) -> list[str]:
    """Command-line inputs → image paths and shard specs, in order.

    Folders are walked for image files (``image_files``); a folder holding ``.tar`` files is also a
    shard set. Globs are expanded (``**`` recurses); ``.tar`` files and brace patterns stay shard
    specs. A spec that matches nothing is kept, so that ``iter_sources`` reports it.
    """
    found: list[str] = []
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            images = [str(p) for p in image_files(path)]
            # A folder with shards is also a shard set; one with neither is kept, to be reported.
            found += images + ([spec] if has_shards(path) or not images else [])
        elif _is_brace(spec) and not path.exists():
            found.append(spec)
        elif glob.has_magic(spec) and not path.exists():
            found += [m for m in sorted(glob.glob(spec, recursive=True)) if Path(m).is_file()] or [spec]
        else:
            found.append(spec)
    return found


def count_sources(inputs: Sequence[str]) -> int | None:
    """How many images ``iter_sources(inputs)`` yields, or None when shards make it unknown upfront."""
    return None if any(is_shard_spec(spec) for spec in inputs) else len(inputs)


def iter_sources(inputs: Sequence[str]) -> Iterator[SourceImage]:
    """One ``SourceImage`` per image of already expanded ``inputs`` (``expand_inputs``), in order.

    Missing files, unsupported types, empty folders and damaged shards are items with ``error`` set;
    image bytes are read (and decoded) only when the item is.
    """
    for spec in inputs:
        path = Path(spec)
        if path.is_dir() and not has_shards(path):
            yield SourceImage(spec, error="a folder without image files or .tar shards")
        elif is_shard_spec(spec):
            yield from shard_sources(spec)
        elif not path.exists():
            yield SourceImage(spec, error="no such file")
        elif path.suffix.lower() not in IMAGE_SUFFIXES:
            kind = path.suffix or path.name
            yield SourceImage(spec, error=f"unsupported file type '{kind}' (use {', '.join(IMAGE_SUFFIXES)})")
        else:
            yield file_source(path, spec)


def file_source(path: Path, name: str | None = None) -> SourceImage:
    """An image file as a ``SourceImage``."""
    return SourceImage(name or str(path), read=path.read_bytes, path=path)


def shard_sources(spec: str) -> Iterator[SourceImage]:
    """Every image sample of a shard set (``data.shards.find_shards``), named ``SHARD#KEY``.

    Nothing is skipped: a sample without an image member is an item with ``error``; a shard that
    cannot be opened or is cut off is one item (named by the shard, ``key`` "") after the samples read
    before the damage, and the next shard is read as usual.
    """
    from mgpt4.data.shards import find_shards, iter_shard_images  # shards decodes with open_image above
    from mgpt4.errors import UsageError

    try:
        shards = find_shards(spec)
    except UsageError as exc:
        yield SourceImage(spec, error=str(exc))
        return
    for sample in iter_shard_images(shards):
        name = f"{sample.shard}#{sample.key}" if sample.key else sample.shard
        if sample.data is None:
            yield SourceImage(name, error=sample.error, shard=sample.shard, key=sample.key)
        else:
            yield SourceImage(name, read=lambda data=sample.data: data, shard=sample.shard, key=sample.key)


def _is_brace(spec: str) -> bool:
    return "{" in spec and ".." in spec
