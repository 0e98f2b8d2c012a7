"""The images to curate, in a fixed order, with the ids the aligned set names its files by.

The images come from the one image source (``data.images``): a folder of image files, one image, or a
shard set. Ids are what ``image/{id}.jpg`` is called: the file stem for a folder (the relative path
joined with ``_`` if stems collide), the sample key for shards. The order is deterministic (sorted
paths; shards in order, samples in tar order) so ``--num N`` always means the same images and a
resumed run sees the same list.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import logging
from collections.abc import Iterator
from pathlib import Path

from PIL import Image

from mgpt4.data.images import (
    IMAGE_SUFFIXES,
    SourceImage,
    file_source,
    has_shards,
    image_files,
    is_image_file,
    shard_sources,
)
from mgpt4.data.shards import find_shards
from mgpt4.errors import UsageError

log = logging.getLogger("mgpt4.curate")


@dataclasses.dataclass
class CurateImage:
    """One image to describe: its aligned-set id and where it comes from (``source.name``)."""

    image_id: str
    source: SourceImage

    @property
    def name(self) -> str:
        return self.source.name

    def load(self) -> Image.Image:
        """Decode as RGB under the shared pixel cap; raises ``ImageReadError`` (a ``DataError``)."""
        return self.source.open()

    def jpeg_bytes(self, quality: int = 95) -> bytes:
        """The image as JPEG: the original bytes when it already is one, else re-encoded."""
        data = self.source.read_bytes()
        if data[:3] == b"\xff\xd8\xff":
            return data
        buffer = io.BytesIO()
        self.load().save(buffer, format="JPEG", quality=quality)
        return buffer.getvalue()


def iter_images(spec: str, num: int | None = None) -> Iterator[CurateImage]:
    """The first ``num`` images of a folder, a single image, or a shard set (folder of ``.tar``, a
    ``.tar`` file or a brace pattern ``{00000..00009}.tar``).

    Raises:
        UsageError: nothing usable at ``spec``.
    """
    path = Path(spec)
    if path.is_dir():
        files = image_files(path)
        if files:
            return itertools.islice(_folder_images(path, files), num)
        if has_shards(path):
            return itertools.islice(_shard_images(spec), num)
        raise UsageError(f"--images {spec}: no image files ({', '.join(IMAGE_SUFFIXES)}) and no .tar shards")
    if is_image_file(path):
        return iter([CurateImage(path.stem, file_source(path))])
    if ".tar" in spec:
        return itertools.islice(_shard_images(spec), num)
    raise UsageError(f"--images {spec}: no such folder, image or shard set")


def count_images(spec: str, num: int) -> int | None:
    """How many images ``iter_images(spec, num)`` yields, when knowable without reading shards."""
    path = Path(spec)
    if path.is_dir():
        count = len(image_files(path))
        return min(num, count) if count else None
    return 1 if is_image_file(path) else None


def _folder_images(root: Path, files: list[Path]) -> Iterator[CurateImage]:
    stems = [f.stem for f in files]
    unique = len(set(stems)) == len(stems)
    for file in files:
        image_id = file.stem if unique else "_".join(file.relative_to(root).with_suffix("").parts)
        yield CurateImage(image_id, file_source(file))


def _shard_images(spec: str) -> Iterator[CurateImage]:
    """Samples of a shard set in shard and tar order; a sample that cannot be read still gets its id
    (and is journaled as unreadable), a broken shard is logged and the next one is read.

    Raises:
        UsageError: no shards at ``spec`` (at once, before anything is read).
    """
    try:
        find_shards(spec)
    except UsageError as exc:
        raise UsageError(f"--images {spec}: no .tar shards found") from exc
    return _shard_samples(spec)


def _shard_samples(spec: str) -> Iterator[CurateImage]:
    for source in shard_sources(spec):
        if not source.key:
            log.warning("%s: %s; curating the rest of the set", source.shard, source.error)
            continue
        yield CurateImage(Path(source.key).name, source)
