"""The images to describe: a folder of image files or a WebDataset shard set, in a fixed order.

Ids are what the aligned set names its files by (``image/{id}.jpg``): the file stem for a folder
(relative path with ``_`` if stems collide), the sample key for shards. The order is deterministic
(sorted paths; shards in order, samples in tar order) so ``--num N`` always means the same images and
a resumed run sees the same list.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
from collections.abc import Callable, Iterator
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from mgpt4.errors import DataError, UsageError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")


@dataclasses.dataclass
class SourceImage:
    """One image to describe: its id, where it came from, and its encoded bytes (read lazily)."""

    image_id: str
    source: str
    read_bytes: Callable[[], bytes]

    def load(self) -> Image.Image:
        """Decode as RGB.

        Raises:
            DataError: the bytes are not an image.
        """
        try:
            image = Image.open(io.BytesIO(self.read_bytes()))
            image.load()
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise DataError(f"{self.source}: not a readable image ({exc})") from exc
        return image.convert("RGB")

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
            return itertools.islice(_shard_images(spec), num)
        raise UsageError(f"--images {spec}: no image files ({', '.join(IMAGE_SUFFIXES)}) and no .tar shards")
    if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
        return iter([SourceImage(path.stem, str(path), path.read_bytes)])
    if ".tar" in spec:
        return itertools.islice(_shard_images(spec), num)
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


def _shard_images(spec: str) -> Iterator[SourceImage]:
    """Samples of a WebDataset shard set in shard order, through ``mgpt4.data.shards``."""
    import webdataset as wds

    from mgpt4.data.shards import find_shards

    urls = [str(u) for u in find_shards(spec)]
    if not urls:
        raise UsageError(f"--images {spec}: no .tar shards found")
    dataset = wds.WebDataset(urls, shardshuffle=False, empty_check=False)
    for sample in dataset:
        key = sample.get("__key__", "")
        data = next((sample[k] for k in ("jpg", "jpeg", "png", "webp") if k in sample), None)
        if data is None:
            continue
        source = f"{sample.get('__url__', spec)}:{key}"
        yield SourceImage(Path(key).name, source, lambda data=data: data)
