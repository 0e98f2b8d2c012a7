"""Reading img2dataset-style WebDataset shards for stage 1: finding, decoding, mixing with ratios.

A shard is ``NNNNN.tar`` holding ``KEY.jpg``, ``KEY.txt`` and ``KEY.json`` (DESIGN.md §5); the caption
comes from the json's ``caption`` field like the official loader, else from ``KEY.txt``.

`ShardMixture` draws an endless stream from several shard sets with sample ratios (official stage 1:
laion 115 : cc_sbu 14). It is deterministic and exactly resumable from a tiny JSON-able state:

- which set sample ``t`` comes from is a hash of ``(seed, rank, t)`` (counter-based, no RNG state);
- each set walks its shards in epochs; the shard order of an epoch and the sample order inside each
  shard are permutations seeded by ``(seed, set, epoch[, shard])``, which shuffles without a buffer;
- a set's position is ``(epoch, shard, pos)``, so resuming reads only the current shard's tar headers
  and seeks to the next sample: no JPEG is decoded for skipped samples.

Ranks get disjoint streams: with at least as many shards as ranks each rank reads every
``world_size``-th shard of the epoch order; with fewer shards every rank reads all shards and takes
every ``world_size``-th sample of each.

Bad samples (corrupt image, no caption, unreadable member, truncated or unreadable tar) are skipped
and counted in ``ShardMixture.skipped``; a set that yields nothing in a full epoch raises `DataError`.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import hashlib
import json
import logging
import os
import random
import re
import tarfile
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import braceexpand
import torch.utils.data
from PIL import Image
from webdataset.tariterators import base_plus_ext

from mgpt4.data.images import IMAGE_SUFFIXES, ImageReadError, open_image
from mgpt4.errors import DataError, UsageError

log = logging.getLogger("mgpt4.data")

# Member extensions that hold the image, in order of preference: the one suffix list of data.images.
IMAGE_EXTENSIONS = tuple(suffix.lstrip(".") for suffix in IMAGE_SUFFIXES)
_STATE_VERSION = 1
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


class _SkipLogger:
    def __init__(self, counter: collections.Counter) -> None:
        self.counter = counter

    def __call__(self, skip: _Skip, where: str) -> None:
        self.counter[skip.reason] += 1
        level = logging.WARNING if self.counter[skip.reason] <= _LOUD_SKIPS else logging.DEBUG
        log.log(level, "skipped (%s) in %s: %s", skip.reason, where, skip)


class _Skip(Exception):
    """A sample (or shard) that cannot be used; ``reason`` names the counter."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class _Shard:
    """An open tar with its samples' members indexed, so any sample can be read by number.

    Hand-written on `tarfile` instead of webdataset's ``tar_file_iterator``/``group_by_keys``: those
    stream every byte, and route every error through one handler, while exact cheap resume needs
    random access to sample ``i`` (headers only, seeking over data), and the skip counters need to
    tell a truncated tar from a bad member. Grouping follows webdataset: consecutive members with the
    same ``base_plus_ext`` key form a sample; ``__*__`` metadata members are ignored.
    """

    def __init__(self, path: str, on_skip: _SkipLogger | None) -> None:
        self.path = path
        self.samples: list[tuple[str, dict[str, tarfile.TarInfo]]] = []
        try:
            self._tar: tarfile.TarFile | None = tarfile.open(path, mode="r:")
        except (OSError, tarfile.TarError) as exc:
            self._tar = None
            if on_skip is not None:
                on_skip(_Skip("unreadable_shard", str(exc)), path)
            return
        try:
            for member in self._tar:
                self._add(member)
        except (OSError, tarfile.TarError) as exc:
            # The members read before the damage are still usable; a cut-off last one fails on read.
            if on_skip is not None:
                on_skip(_Skip("truncated_shard", str(exc)), path)

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
        """Decode sample ``index`` to ``(key, RGB image, processed caption)``; raises `_Skip`."""
        key, members = self.samples[index]
        image_ext = next((e for e in IMAGE_EXTENSIONS if e in members), None)
        if image_ext is None:
            raise _Skip("missing_image", f"{key}: no {'/'.join(IMAGE_EXTENSIONS)} member")
        caption = _caption(key, self._bytes(members.get("json")), self._bytes(members.get("txt")))
        text = text_processor(caption)
        if not text.strip():
            raise _Skip("empty_caption", f"{key}: caption {caption!r} is empty after processing")
        try:
            image = open_image(self._bytes(members[image_ext]), f"{key}.{image_ext}")
        except ImageReadError as exc:
            raise _Skip("bad_image", str(exc)) from exc
        return key, image, text

    def _bytes(self, member: tarfile.TarInfo | None) -> bytes | None:
        if member is None:
            return None
        assert self._tar is not None
        try:
            handle = self._tar.extractfile(member)
            assert handle is not None  # regular files only were indexed
            return handle.read()
        except (OSError, tarfile.TarError) as exc:
            raise _Skip("unreadable_member", f"{member.name}: {exc}") from exc

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None


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
    raise _Skip("missing_caption", f"{key}: no caption in .json or .txt")


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
        damage: list[_Skip] = []
        shard = _Shard(path, lambda skip, _where, damage=damage: damage.append(skip))  # during __init__
        try:
            for key, members in shard.samples:
                image_ext = next((e for e in IMAGE_EXTENSIONS if e in members), None)
                if image_ext is None:
                    yield ShardImage(path, key, error=f"no image member ({'/'.join(IMAGE_EXTENSIONS)})")
                    continue
                try:
                    data = shard._bytes(members[image_ext])
                except _Skip as skip:
                    yield ShardImage(path, key, error=str(skip))
                    continue
                yield ShardImage(path, key, data)
        finally:
            shard.close()
        for skip in damage:
            detail = str(skip).strip().splitlines()[0] if str(skip).strip() else skip.reason
            yield ShardImage(path, "", error=f"{skip.reason.replace('_', ' ')} ({detail})")


# --------------------------------------------------------------------------------------------------
# The mixture
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Cursor:
    """Where one shard set's stream stands for this rank."""

    epoch: int = 0
    shard: int = 0  # index into this rank's shards of the epoch
    pos: int = 0  # index into this rank's sample order of that shard
    good: int = 0  # samples yielded this epoch; still 0 after a full epoch means the set is unreadable


def _unit(*parts: object) -> float:
    """A uniform number in [0, 1) that depends only on ``parts`` (counter-based randomness)."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


def _permutation(n: int, *parts: object) -> list[int]:
    order = list(range(n))
    random.Random(":".join(map(str, parts))).shuffle(order)  # str seeds are hashed: stable across runs
    return order


class _SetStream:
    """The endless, rank-split, epoch-shuffled stream of one shard set."""

    def __init__(self, index: int, shards: Sequence[str], seed: int, rank: int, world_size: int) -> None:
        self.index, self.shards, self.seed = index, list(shards), seed
        self.rank, self.world_size = rank, world_size
        self.cursor = _Cursor()
        self._open: tuple[int, int] | None = None  # (epoch, shard) of the open shard
        self._shard: _Shard | None = None
        self._order: list[int] = []
        self._epoch_shards: tuple[int, list[int]] = (-1, [])
        self.split_shards = len(self.shards) >= world_size  # else every rank takes every world_size-th sample

    def epoch_shards(self, epoch: int) -> list[int]:
        if self._epoch_shards[0] != epoch:  # cached: laion has ~10k shards
            order = _permutation(len(self.shards), "shards", self.seed, self.index, epoch)
            self._epoch_shards = (epoch, order[self.rank :: self.world_size] if self.split_shards else order)
        return self._epoch_shards[1]

    def _ensure_open(self, shard_id: int, on_skip: _SkipLogger) -> None:
        where = (self.cursor.epoch, self.cursor.shard)
        if self._open == where:
            return
        self.close()
        # A damaged tar is counted when first opened, not again when a resume reopens it mid-way.
        self._shard = _Shard(self.shards[shard_id], on_skip if self.cursor.pos == 0 else None)
        order = _permutation(len(self._shard.samples), "samples", self.seed, self.index, where[0], shard_id)
        self._order = order if self.split_shards else order[self.rank :: self.world_size]
        self._open = where

    def next(
        self, text_processor: Callable[[str], str], on_skip: _SkipLogger
    ) -> tuple[str, Image.Image, str]:
        """The next good ``(key, image, text)``; advances the cursor past skipped samples."""
        cur = self.cursor
        while True:
            shards = self.epoch_shards(cur.epoch)
            if cur.shard >= len(shards):
                if cur.good == 0:
                    skipped = dict(on_skip.counter)
                    raise DataError(
                        f"shard set {self.index} ({self.shards[0]} …, {len(self.shards)} shards): no "
                        f"readable sample in a full pass on rank {self.rank} (skipped so far: {skipped})"
                    )
                self.cursor = cur = _Cursor(epoch=cur.epoch + 1)
                continue
            self._ensure_open(shards[cur.shard], on_skip)
            assert self._shard is not None
            if cur.pos >= len(self._order):
                cur.shard, cur.pos = cur.shard + 1, 0
                continue
            sample_index = self._order[cur.pos]
            cur.pos += 1
            try:
                result = self._shard.read(sample_index, text_processor)
            except _Skip as skip:
                on_skip(skip, self._shard.path)
                continue
            cur.good += 1
            return result

    def close(self) -> None:
        if self._shard is not None:
            self._shard.close()
        self._shard, self._open = None, None


class ShardMixture(torch.utils.data.IterableDataset):
    """An endless, deterministic, exactly resumable mixture of shard sets (see the module docstring).

    Iterating continues from the current position and yields ``{"image", "text", "key"}`` dicts.
    Iterate it in the training process (``DataLoader(num_workers=0)`` or directly): its state lives in
    this object, which worker processes would copy.

    Args:
        sets: ``[(shard paths, ratio), ...]``; sample probabilities are proportional to the ratios.
        seed: data seed shared by all ranks.
        rank: this process's rank.
        world_size: number of ranks; each gets a disjoint stream.
        transform: PIL RGB image → model input (e.g. a tensor); None keeps the PIL image.
        text_processor: caption → training text (stage 1: `blip_caption`); None keeps it raw.
    """

    def __init__(
        self,
        sets: Sequence[tuple[Sequence[str], float]],
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        transform: Callable[[Image.Image], Any] | None = None,
        text_processor: Callable[[str], str] | None = None,
    ) -> None:
        super().__init__()
        if not sets:
            raise UsageError("no shard sets given to mix")
        if not 0 <= rank < world_size:
            raise UsageError(f"rank {rank} is outside world_size {world_size}")
        for index, (shards, ratio) in enumerate(sets):
            if not shards:
                raise UsageError(f"shard set {index} is empty")
            if not ratio > 0:
                raise UsageError(f"shard set {index} ({shards[0]} …) has ratio {ratio}; ratios must be > 0")
        total = sum(ratio for _, ratio in sets)
        self.probabilities = [ratio / total for _, ratio in sets]
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.transform = transform
        self.text_processor = text_processor or (lambda caption: caption)
        self.streams = [_SetStream(i, shards, seed, rank, world_size) for i, (shards, _) in enumerate(sets)]
        self.samples_yielded = 0  # also the draw counter t that picks the set of the next sample
        self.skipped: collections.Counter = collections.Counter()
        self._on_skip = _SkipLogger(self.skipped)

    def _choose_set(self, t: int) -> int:
        u = _unit("mix", self.seed, self.rank, t)
        acc = 0.0
        for index, p in enumerate(self.probabilities):
            acc += p
            if u < acc:
                return index
        return len(self.probabilities) - 1  # rounding: acc may end just below 1

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if torch.utils.data.get_worker_info() is not None:
            raise UsageError("ShardMixture keeps its resume state in-process: use DataLoader(num_workers=0)")
        while True:
            yield self.next_sample()

    def next_sample(self) -> dict[str, Any]:
        """The next sample of the stream: ``{"image": transform(pil), "text": str, "key": str}``."""
        stream = self.streams[self._choose_set(self.samples_yielded)]
        key, image, text = stream.next(self.text_processor, self._on_skip)
        self.samples_yielded += 1
        return {"image": self.transform(image) if self.transform else image, "text": text, "key": key}

    def state_dict(self) -> dict[str, Any]:
        """A small JSON-able position: restoring it continues with exactly the samples that would follow."""
        return {
            "version": _STATE_VERSION,
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "samples_yielded": self.samples_yielded,
            "sets": [{**dataclasses.asdict(s.cursor), "num_shards": len(s.shards)} for s in self.streams],
            "skipped": dict(self.skipped),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a `state_dict`; a changed seed, rank split or shard list resumes inexactly."""
        if state.get("version") != _STATE_VERSION or len(state.get("sets", ())) != len(self.streams):
            raise UsageError(
                f"data state (version {state.get('version')}, {len(state.get('sets', ()))} shard sets) does "
                f"not fit this mixture (version {_STATE_VERSION}, {len(self.streams)} sets)"
            )
        for name in ("seed", "rank", "world_size"):
            if state[name] != getattr(self, name):
                log.warning("resuming data with %s %s (saved: %s): the sample order changes", name,
                            getattr(self, name), state[name])  # fmt: skip
        for stream, saved in zip(self.streams, state["sets"], strict=True):
            if saved["num_shards"] != len(stream.shards):
                log.warning("shard set %d now has %d shards (saved: %d): the sample order changes",
                            stream.index, len(stream.shards), saved["num_shards"])  # fmt: skip
            stream.close()
            stream.cursor = _Cursor(saved["epoch"], saved["shard"], saved["pos"], saved["good"])
        self.samples_yielded = state["samples_yielded"]
        self.skipped.clear()
        self.skipped.update(state["skipped"])

    def close(self) -> None:
        """Close the open tar files (they reopen on the next sample)."""
        for stream in self.streams:
            stream.close()
