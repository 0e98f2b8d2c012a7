"""Reading img2dataset-style WebDataset shards: finding them, indexing a tar, decoding its samples.

A shard is ``NNNNN.tar`` holding ``KEY.jpg``, ``KEY.txt`` and ``KEY.json`` (DESIGN.md §5); the caption
comes from the json's ``caption`` field like the official loader, else from ``KEY.txt``.

- ``find_shards``: a folder, glob or brace pattern → tar paths (complete shards only).
- ``ShardFile`` indexes a tar's headers so any sample can be read by number; ``read_sample`` decodes
  one (a bad one raises ``SampleSkip``, whose ``reason`` names the skip counter).
- ``iter_shard_images``: one pass in file order, undecoded (the image source of describe, curate, eval).

Stage 1's endless, resumable mixture of shard sets is ``mgpt4.data.mixture.ShardMixture``.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import json
import logging
import os
import re
import tarfile
from collections.abc import Callable, Iterator, Sequence

import braceexpand
from PIL import Image
from webdataset.tariterators import base_plus_ext

from mgpt4.data.images import IMAGE_SUFFIXES, ImageReadError, open_image
from mgpt4.errors import UsageError

log = logging.getLogger("mgpt4.data")

# Member extensions that hold the image, in order of preference: the one suffix list of data.images.
IMAGE_EXTENSIONS = tuple(suffix.lstrip(".") for suffix in IMAGE_SUFFIXES)
_LOUD_SKIPS = 10  # per reason, warn about the first few skips, then log them at debug level


def blip_caption(text: str, max_words: int = 50) -> str:
    """The official stage-1 text processor (MG ``BlipCaptionProcessor.pre_caption``).

    Lowercase; each of ``.!"()*#:;~`` becomes a space; runs of 2+ whitespace become one space; strip
    spaces; keep the first ``max_words`` words. Reproduced exactly, quirks included: a single tab or
    newline inside the text is kept, as upstream's ``\\s{2,}`` only collapses runs.
    """
    caption = re.sub(r"([.!\"()*#:;~])", " ", text.lower())
    caption = re.sub(r"\s{2,}", " ", caption)
    caption = caption.rstrip("\n").strip(" ")
    words = caption.split(" ")
    if len(words) > max_words:
        caption = " ".join(words[:max_words])
    return caption


# --------------------------------------------------------------------------------------------------
# Finding shards
# --------------------------------------------------------------------------------------------------


def find_shards(spec: str | os.PathLike) -> list[str]:
    """Resolve a shard folder, glob or brace pattern to a sorted list of tar paths.

    Args:
        spec: a folder (its ``*.tar``; when any ``NNNNN_stats.json`` exist, only the tars that have
            one, i.e. complete shards), a glob (``shards/*.tar``), a WebDataset brace pattern
            (``shards/{00000..00012}.tar``; missing members are left out) or one tar file.

    Returns:
        Shard paths, in order, without duplicates.

    Raises:
        UsageError: nothing matched.
    """
    spec = os.fspath(spec)
    found: dict[str, None] = {}  # ordered set
    for piece in braceexpand.braceexpand(spec):
        if os.path.isdir(piece):
            paths = _complete_shards(piece)
        elif glob.has_magic(piece):
            paths = sorted(glob.glob(piece))
        else:
            paths = [piece] if os.path.isfile(piece) else []
        found.update(dict.fromkeys(paths))
    if not found:
        raise UsageError(
            f"no shards found at {spec}: give a folder of .tar shards, a glob or {{00000..00009}}.tar"
        )
    return list(found)


def _complete_shards(folder: str) -> list[str]:
    tars = sorted(glob.glob(os.path.join(glob.escape(folder), "*.tar")))
    # img2dataset (and `mgpt4 download`) write NNNNN_stats.json last: it marks a finished shard.
    if glob.glob(os.path.join(glob.escape(folder), "*_stats.json")):
        complete = [t for t in tars if os.path.isfile(t[: -len(".tar")] + "_stats.json")]
        if len(complete) < len(tars):
            log.info(
                "%s: skipping %d shards without _stats.json (incomplete)", folder, len(tars) - len(complete)
            )
        return complete
    return tars


# --------------------------------------------------------------------------------------------------
# One shard: index the tar headers, decode chosen samples
# --------------------------------------------------------------------------------------------------


class SkipCounter:
    """Counts skips by reason into ``counter`` and logs them (the first few of each reason as warnings)."""

    def __init__(self, counter: collections.Counter) -> None:
        self.counter = counter

    def __call__(self, skip: SampleSkip, where: str) -> None:
        self.counter[skip.reason] += 1
        level = logging.WARNING if self.counter[skip.reason] <= _LOUD_SKIPS else logging.DEBUG
        log.log(level, "skipped (%s) in %s: %s", skip.reason, where, skip)


class SampleSkip(Exception):
    """A sample (or shard) that cannot be used; ``reason`` names the counter."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


Members = dict[str, tarfile.TarInfo]  # a sample's tar members by extension ("jpg", "txt", "json")


class ShardFile:
    """A tar with its samples' members indexed (``samples``, by key), so any sample can be read by number.

    Hand-written on `tarfile` instead of webdataset's ``tar_file_iterator``/``group_by_keys``: those
    stream every byte, and route every error through one handler, while exact cheap resume needs
    random access to sample ``i`` (headers only, seeking over data), and the skip counters need to
    tell a truncated tar from a bad member. Grouping follows webdataset: consecutive members with the
    same ``base_plus_ext`` key form a sample; ``__*__`` metadata members are ignored.
    """

    def __init__(self, path: str, on_skip: Callable[[SampleSkip, str], None] | None) -> None:
        self.path = path
        self.samples: list[tuple[str, Members]] = []
        try:
            self._tar: tarfile.TarFile | None = tarfile.open(path, mode="r:")
        except (OSError, tarfile.TarError) as exc:
            self._tar = None
            if on_skip is not None:
                on_skip(SampleSkip("unreadable_shard", str(exc)), path)
            return
        try:
            for member in self._tar:
                self._add(member)
        except (OSError, tarfile.TarError) as exc:
            # The members read before the damage are still usable; a cut-off last one fails on read.
            if on_skip is not None:
                on_skip(SampleSkip("truncated_shard", str(exc)), path)
        # Key order, not write order: a downloader writes samples as their fetches complete, so the same
        # rows downloaded twice make tars in different orders. Sorted, sample ``i`` (and with it a seeded
        # run's batches) depends only on what the shard holds. Stable: a repeated key keeps its order.
        self.samples.sort(key=lambda sample: sample[0])

    def _add(self, member: tarfile.TarInfo) -> None:
        if not member.isreg() or os.path.basename(member.name).startswith("__"):
            return
        key, ext = base_plus_ext(member.name)
        if key is None:
            return
        if not self.samples or self.samples[-1][0] != key:
            self.samples.append((key, {}))
        self.samples[-1][1].setdefault(ext.lower(), member)

    def read(self, index: int, text_processor: Callable[[str], str]) -> tuple[str, Image.Image, str]:
        """Decode sample ``index`` to ``(key, RGB image, processed caption)``; raises `SampleSkip`."""
        assert self._tar is not None
        key, members = self.samples[index]
        return read_sample(self._tar, key, members, text_processor)

    def _bytes(self, member: tarfile.TarInfo | None) -> bytes | None:
        assert self._tar is not None
        return _member_bytes(self._tar, member)

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None


def read_sample(
    tar: tarfile.TarFile, key: str, members: Members, text_processor: Callable[[str], str]
) -> tuple[str, Image.Image, str]:
    """Decode one sample of an open tar to ``(key, RGB image, processed caption)``.

    Raises:
        SampleSkip: no image member, no caption, an empty caption, an unreadable member or image.
    """
    image_ext = next((e for e in IMAGE_EXTENSIONS if e in members), None)
    if image_ext is None:
        raise SampleSkip("missing_image", f"{key}: no {'/'.join(IMAGE_EXTENSIONS)} member")
    caption = _caption(key, _member_bytes(tar, members.get("json")), _member_bytes(tar, members.get("txt")))
    text = text_processor(caption)
    if not text.strip():
        raise SampleSkip("empty_caption", f"{key}: caption {caption!r} is empty after processing")
    try:
        image = open_image(_member_bytes(tar, members[image_ext]), f"{key}.{image_ext}")
    except ImageReadError as exc:
        raise SampleSkip("bad_image", str(exc)) from exc
    return key, image, text


def _member_bytes(tar: tarfile.TarFile, member: tarfile.TarInfo | None) -> bytes | None:
    if member is None:
        return None
    try:
        handle = tar.extractfile(member)
        assert handle is not None  # regular files only were indexed
        return handle.read()
    except (OSError, tarfile.TarError) as exc:
        raise SampleSkip("unreadable_member", f"{member.name}: {exc}") from exc


def _caption(key: str, json_bytes: bytes | None, txt_bytes: bytes | None) -> str:
    """The json ``caption`` (what the official loader reads), else the ``.txt`` member."""
    if json_bytes is not None:
        try:
            caption = json.loads(json_bytes).get("caption")
            if isinstance(caption, str) and caption.strip():
                return caption
        except (ValueError, AttributeError):
            pass  # malformed json: the .txt member may still hold the caption
    if txt_bytes is not None:
        try:
            caption = txt_bytes.decode("utf-8")
            if caption.strip():
                return caption
        except UnicodeDecodeError:
            pass
    raise SampleSkip("missing_caption", f"{key}: no caption in .json or .txt")


@dataclasses.dataclass
class ShardImage:
    """One image sample of a shard set as encoded bytes, or why it (or its whole shard) cannot be read."""

    shard: str
    key: str  # "" when ``error`` is about the whole shard
    data: bytes | None = None
    error: str | None = None


def iter_shard_images(shards: Sequence[str]) -> Iterator[ShardImage]:
    """Every sample of ``shards`` in file and tar order, undecoded, with failures in line (the image
    source of describe, curate and eval: ``data.images.shard_sources``).

    Unlike the training mixture nothing is skipped and no caption is needed: a sample without an
    image member or whose member cannot be read is a failure for that key; a shard that cannot be
    opened, or is cut off, yields one failure after the samples read before the damage, and the next
    shard is read as usual.
    """
    for path in shards:
        damage: list[SampleSkip] = []
        shard = ShardFile(path, lambda skip, _where, damage=damage: damage.append(skip))  # during __init__
        try:
            for key, members in shard.samples:
                image_ext = next((e for e in IMAGE_EXTENSIONS if e in members), None)
                if image_ext is None:
                    yield ShardImage(path, key, error=f"no image member ({'/'.join(IMAGE_EXTENSIONS)})")
                    continue
                try:
                    data = shard._bytes(members[image_ext])
                except SampleSkip as skip:
                    yield ShardImage(path, key, error=str(skip))
                    continue
                yield ShardImage(path, key, data)
        finally:
            shard.close()
        for skip in damage:
            detail = str(skip).strip().splitlines()[0] if str(skip).strip() else skip.reason
            yield ShardImage(path, "", error=f"{skip.reason.replace('_', ' ')} ({detail})")
