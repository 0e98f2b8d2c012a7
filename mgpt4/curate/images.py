"""The images to describe: a folder of image files or a WebDataset shard set, in a fixed order.

Ids are what the aligned set names its files by (``image/{id}.jpg``): the file stem for a folder
(relative path with ``_`` if stems collide), the sample key for shards. The order is deterministic
(sorted paths; shards in order, samples in tar order) so ``--num N`` always means the same images and
a resumed run sees the same list.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import itertools
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

from PIL import Image

from mgpt4.data.images import open_image
from mgpt4.data.shards import ShardImage, find_shards, iter_shard_images
from mgpt4.errors import DataError, UsageError

log = logging.getLogger("mgpt4.curate")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")


@dataclasses.dataclass
class SourceImage:
    """One image to describe: its id, where it came from, and its encoded bytes (read lazily)."""

    image_id: str
    source: str
    read_bytes: Callable[[], bytes]

    def load(self) -> Image.Image:
        """Decode as RGB, under the shared pixel cap (``data.images.open_image``).

        Raises:
            DataError: the file cannot be read, or its bytes are not a usable image.
        """
        try:
            data = self.read_bytes()
        except OSError as exc:  # e.g. deleted or made unreadable since the folder was listed
            raise DataError(f"{self.source}: cannot read ({exc.strerror or exc})") from exc
        return open_image(data, self.source)

    def jpeg_bytes(self, quality: int = 95) -> bytes:
        """The image as JPEG: the original bytes when it already is one, else re-encoded."""
        data = self.read_bytes()
        if data[:3] == b"\xff\xd8\xff":
            return data
        buffer = io.BytesIO()
        self.load().save(buffer, format="JPEG", quality=quality)
        return buffer.getvalue()


def iter_images(spec: str, num: int | None = None) -> Iterator[SourceImage]:
    """The first ``num`` images of a folder, a single image, or a shard set (folder of ``.tar``, a
    ``.tar`` file or a brace pattern ``{00000..00009}.tar``).

    Raises:
        UsageError: nothing usable at ``spec``.
    """
    path = Path(spec)
    if path.is_dir():
        files = _image_files(path)
        if files:
            return itertools.islice(_folder_images(path, files), num)
        if any(path.glob("*.tar")):
            return itertools.islice(_shard_images(_shard_urls(spec)), num)
        raise UsageError(f"--images {spec}: no image files ({', '.join(IMAGE_SUFFIXES)}) and no .tar shards")
    if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
        return iter([SourceImage(path.stem, str(path), path.read_bytes)])
    if ".tar" in spec:
        return itertools.islice(_shard_images(_shard_urls(spec)), num)
    raise UsageError(f"--images {spec}: no such folder, image or shard set")


def count_images(spec: str, num: int) -> int | None:
    """How many images ``iter_images(spec, num)`` yields, when knowable without reading shards."""
    path = Path(spec)
    if path.is_dir():
        count = len(_image_files(path))
        return min(num, count) if count else None
    if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
        return 1
    return None


def _image_files(root: Path) -> list[Path]:
    # Hidden files (".x.jpg", editor/OS droppings) cannot be aligned-set ids and are not data.
    return sorted(
        p for p in root.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file()
    )  # fmt: skip


def _folder_images(root: Path, files: list[Path]) -> Iterator[SourceImage]:
    stems = [f.stem for f in files]
    unique = len(set(stems)) == len(stems)
    for file in files:
        image_id = file.stem if unique else "_".join(file.relative_to(root).with_suffix("").parts)
        yield SourceImage(image_id, str(file), file.read_bytes)


def _shard_urls(spec: str) -> list[str]:
    try:
        return find_shards(spec)
    except UsageError as exc:
        raise UsageError(f"--images {spec}: no .tar shards found") from exc


def _shard_images(urls: list[str]) -> Iterator[SourceImage]:
    """Samples of a shard set in shard and tar order; a sample that cannot be read still gets its id
    (and is journaled as unreadable), a broken shard is logged and the next one is read."""
    for sample in iter_shard_images(urls):
        if not sample.key:
            log.warning("%s: %s; curating the rest of the set", sample.shard, sample.error)
            continue
        source = f"{sample.shard}:{sample.key}"
        yield SourceImage(Path(sample.key).name, source, functools.partial(_sample_bytes, sample, source))


def _sample_bytes(sample: ShardImage, source: str) -> bytes:
    if sample.data is None:
        raise DataError(f"{source}: {sample.error}")
    return sample.data
