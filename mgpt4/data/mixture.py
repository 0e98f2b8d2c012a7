"""``ShardMixture``: stage 1's endless, deterministic, exactly resumable mixture of shard sets.

It draws from several shard sets with sample ratios (official stage 1: laion 115 : cc_sbu 14) and
resumes exactly from a tiny JSON-able state:

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

**Plan, decode, consume.** Each set *plans* its stream in the training process: the next tar member to
read, the damage found when a shard is first reached, the end of an epoch. Planned samples are decoded
(member read, JPEG decode, transform) either here when they are needed (``num_workers=0``) or by worker
processes up to ``prefetch`` samples ahead (``mgpt4.data.decode_pool``). Planned items are *consumed* in
plan order, and only consuming moves what ``state_dict`` saves — positions, the draw counter, the skip
counters — so a checkpoint describes the samples handed to training, never those decoded ahead, and
holds the same numbers with or without workers. A bad sample makes its set plan one more (the one the
stream reads next), so the samples, their order and the counts do not depend on how they were decoded.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import itertools
import logging
import random
import tarfile
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import torch
import torch.utils.data
from PIL import Image

from mgpt4.data.decode_pool import DecodePool
from mgpt4.data.shards import Members, SampleSkip, ShardFile, SkipCounter, read_sample
from mgpt4.errors import DataError, UsageError

log = logging.getLogger("mgpt4.data")

_STATE_VERSION = 1
_OPEN_TARS = 8  # tar handles a decoding process keeps open (sets x shards in flight, with room)


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


def _unchanged(caption: str) -> str:
    return caption


# --------------------------------------------------------------------------------------------------
# Decoding planned samples: here, or in worker processes
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _SampleTask:
    """What it takes to decode one planned sample (small and picklable: it travels to a worker)."""

    path: str
    key: str
    members: Members


class _SampleReader:
    """Decodes planned samples to ``("ok", key, transform(image), text)`` or ``("skip", reason, detail)``."""

    def __init__(self, transform: Callable[[Image.Image], Any] | None, text_processor: Callable[[str], str]):
        self.transform, self.text_processor = transform, text_processor
        self._tars: collections.OrderedDict[str, tarfile.TarFile] = collections.OrderedDict()

    def __call__(self, task: _SampleTask) -> tuple:
        try:
            key, image, text = read_sample(self._tar(task.path), task.key, task.members, self.text_processor)
        except SampleSkip as skip:
            return ("skip", skip.reason, str(skip))
        return ("ok", key, self.transform(image) if self.transform else image, text)

    def _tar(self, path: str) -> tarfile.TarFile:
        tar = self._tars.pop(path, None)
        if tar is None:
            try:
                tar = tarfile.open(path, mode="r:")
            except (OSError, tarfile.TarError) as exc:  # indexed a moment ago: changed or gone since
                raise SampleSkip("unreadable_member", f"{path}: {exc}") from exc
            if len(self._tars) >= _OPEN_TARS:
                self._tars.popitem(last=False)[1].close()
        self._tars[path] = tar
        return tar

    def close(self) -> None:
        for tar in self._tars.values():
            tar.close()
        self._tars.clear()


class _DecodeHere:
    """``num_workers=0``: a planned sample is decoded in this process when it is consumed."""

    def __init__(self, reader: _SampleReader) -> None:
        self.reader = reader
        self._tasks: dict[int, _SampleTask] = {}

    def submit(self, ticket: int, task: _SampleTask) -> None:
        self._tasks[ticket] = task

    def result(self, ticket: int) -> tuple:
        return self.reader(self._tasks.pop(ticket))

    def forget(self) -> None:
        self._tasks.clear()

    def close(self) -> None:
        self._tasks.clear()
        self.reader.close()


# --------------------------------------------------------------------------------------------------
# One shard set: planned ahead, consumed in order
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Planned:
    """One step of a set's plan: a sample (decoded under ``ticket``), a shard's damage, or an epoch's end."""

    kind: Literal["sample", "damage", "epoch_end"]
    epoch: int
    shard: int = 0
    pos: int = 0  # a sample: the set's position just after it
    path: str = ""
    ticket: int = -1
    skip: SampleSkip | None = None


class _SetStream:
    """The endless, rank-split, epoch-shuffled stream of one shard set.

    ``cursor`` is the consumed position (what a checkpoint saves); ``pending`` holds what was planned
    past it, ``queued`` of which are samples.
    """

    def __init__(self, index: int, shards: Sequence[str], seed: int, rank: int, world_size: int) -> None:
        self.index, self.shards, self.seed = index, list(shards), seed
        self.rank, self.world_size = rank, world_size
        self.cursor = _Cursor()
        self._epoch_shards: tuple[int, list[int]] = (-1, [])
        self.split_shards = len(self.shards) >= world_size  # else every rank takes every world_size-th sample
        self.restart_plan()

    def restart_plan(self) -> None:
        """Forget what was planned; plan again from the consumed position."""
        self.pending: collections.deque[_Planned] = collections.deque()
        self.queued = 0
        self.exhausted = False  # an epoch planned from its start held no sample: nothing left to plan
        self._plan = _Cursor(self.cursor.epoch, self.cursor.shard, self.cursor.pos)
        self._planned_this_epoch = 0
        self._epoch_from_start = (self.cursor.shard, self.cursor.pos) == (0, 0)
        self._indexed: tuple[int, int] | None = None  # (epoch, shard) whose index is held
        self._path, self._samples, self._order = "", [], []

    def epoch_shards(self, epoch: int) -> list[int]:
        if self._epoch_shards[0] != epoch:  # cached: laion has ~10k shards
            order = _permutation(len(self.shards), "shards", self.seed, self.index, epoch)
            self._epoch_shards = (epoch, order[self.rank :: self.world_size] if self.split_shards else order)
        return self._epoch_shards[1]

    def plan_step(self, submit: Callable[[_SampleTask], int]) -> None:
        """Extend the plan by one step: an epoch's end, a shard's damage, a shard left behind, or a sample."""
        plan = self._plan
        shards = self.epoch_shards(plan.epoch)
        if plan.shard >= len(shards):
            self.pending.append(_Planned("epoch_end", plan.epoch))
            self.exhausted = self._epoch_from_start and self._planned_this_epoch == 0
            self._plan = _Cursor(epoch=plan.epoch + 1)
            self._planned_this_epoch, self._epoch_from_start = 0, True
            return
        if self._indexed != (plan.epoch, plan.shard):
            self._index(plan.epoch, plan.shard, shards[plan.shard])
        if plan.pos >= len(self._order):
            plan.shard, plan.pos = plan.shard + 1, 0
            return
        key, members = self._samples[self._order[plan.pos]]
        plan.pos += 1
        ticket = submit(_SampleTask(self._path, key, members))
        self.pending.append(_Planned("sample", plan.epoch, plan.shard, plan.pos, self._path, ticket))
        self.queued += 1
        self._planned_this_epoch += 1

    def _index(self, epoch: int, position: int, shard_id: int) -> None:
        path = self.shards[shard_id]
        damage: list[SampleSkip] = []
        shard = ShardFile(path, lambda skip, _where: damage.append(skip))
        shard.close()  # the index is all the plan needs; decoding opens the tar itself
        if self._plan.pos == 0:  # counted when first reached, not again when a resume reopens it mid-way
            self.pending.extend(_Planned("damage", epoch, path=path, skip=skip) for skip in damage)
        order = _permutation(len(shard.samples), "samples", self.seed, self.index, epoch, shard_id)
        self._order = order if self.split_shards else order[self.rank :: self.world_size]
        self._path, self._samples, self._indexed = path, shard.samples, (epoch, position)


# --------------------------------------------------------------------------------------------------
# The mixture
# --------------------------------------------------------------------------------------------------


class ShardMixture(torch.utils.data.IterableDataset):
    """An endless, deterministic, exactly resumable mixture of shard sets (see the module docstring).

    Iterating continues from the current position and yields ``{"image", "text", "key"}`` dicts.
    Iterate it in the training process (``DataLoader(num_workers=0)`` or directly): its state lives in
    this object; for decoding in other processes give it ``num_workers`` instead.

    Args:
        sets: ``[(shard paths, ratio), ...]``; sample probabilities are proportional to the ratios.
        seed: data seed shared by all ranks.
        rank: this process's rank.
        world_size: number of ranks; each gets a disjoint stream.
        transform: PIL RGB image → model input (e.g. a tensor); None keeps the PIL image.
        text_processor: caption → training text (stage 1: `blip_caption`); None keeps it raw.
        num_workers: processes that read and decode samples (0: this process, when they are needed).
        prefetch: samples decoded ahead by the workers (ignored without workers).
    """

    def __init__(
        self,
        sets: Sequence[tuple[Sequence[str], float]],
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        transform: Callable[[Image.Image], Any] | None = None,
        text_processor: Callable[[str], str] | None = None,
        num_workers: int = 0,
        prefetch: int = 0,
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
        if num_workers < 0 or prefetch < 0:
            raise UsageError(f"num_workers and prefetch must be ≥ 0, got {num_workers} and {prefetch}")
        total = sum(ratio for _, ratio in sets)
        self.probabilities = [ratio / total for _, ratio in sets]
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.transform = transform
        self.text_processor = text_processor or _unchanged
        self.num_workers, self.prefetch = num_workers, (prefetch if num_workers else 0)
        self.streams = [_SetStream(i, shards, seed, rank, world_size) for i, (shards, _) in enumerate(sets)]
        self.samples_yielded = 0  # also the draw counter t that picks the set of the next sample
        self.skipped: collections.Counter = collections.Counter()
        self._on_skip = SkipCounter(self.skipped)
        self._decoder: _DecodeHere | DecodePool | None = None  # started by the first sample
        self._tickets = itertools.count()
        self._restart_plan()

    @property
    def worker_pids(self) -> list[int]:
        """The decoding processes' pids (none before the first sample or without workers)."""
        return self._decoder.pids if isinstance(self._decoder, DecodePool) else []

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
            raise UsageError(
                "ShardMixture keeps its resume state in-process: use DataLoader(num_workers=0) and give the "
                "mixture num_workers instead"
            )
        while True:
            yield self.next_sample()

    def next_sample(self) -> dict[str, Any]:
        """The next sample of the stream: ``{"image": transform(pil), "text": str, "key": str}``."""
        if self._decoder is None:
            self._decoder = self._start_decoder()
        if self._planned_draws == self.samples_yielded:
            self._plan_draw()
        while self._in_flight < self.prefetch and self._plan_draw():
            pass
        stream = self.streams[self._choose_set(self.samples_yielded)]
        key, image, text = self._next_good(stream)
        self._need[stream.index] -= 1
        self.samples_yielded += 1
        return {"image": image, "text": text, "key": key}

    def _start_decoder(self) -> _DecodeHere | DecodePool:
        reader = _SampleReader(self.transform, self.text_processor)
        if not self.num_workers:
            return _DecodeHere(reader)
        # A transform with one output shape (a resize to a fixed size) lets images travel through shared
        # slots. In flight are up to ``prefetch`` samples plus the few planned past it (the sample being
        # consumed, a skipped sample's replacement); a task that finds no free slot waits in the pool.
        probe = self.transform(Image.new("RGB", (16, 16))) if self.transform else None
        slot_like = probe if isinstance(probe, torch.Tensor) else None
        return DecodePool(reader, self.num_workers, slot_like, slots=self.prefetch + 2)

    # planning ---------------------------------------------------------------------------------------

    def _restart_plan(self) -> None:
        """Drop what was planned or decoded ahead; plan again from the consumed position."""
        for stream in self.streams:
            stream.restart_plan()
        self._need = [0] * len(self.streams)  # samples each set owes to draws planned, not yet consumed
        self._planned_draws = self.samples_yielded
        self._in_flight = 0  # planned samples not consumed yet (decoding, decoded, or waiting to be)
        if self._decoder is not None:
            self._decoder.forget()

    def _plan_draw(self) -> bool:
        """Plan draw ``_planned_draws``: its set plans one more sample. False: that set has none left."""
        stream = self.streams[self._choose_set(self._planned_draws)]
        self._planned_draws += 1
        self._need[stream.index] += 1
        self._top_up(stream)
        return not stream.exhausted

    def _top_up(self, stream: _SetStream) -> None:
        while stream.queued < self._need[stream.index] and not stream.exhausted:
            stream.plan_step(self._submit)

    def _submit(self, task: _SampleTask) -> int:
        ticket = next(self._tickets)
        assert self._decoder is not None
        self._decoder.submit(ticket, task)
        self._in_flight += 1
        return ticket

    # consuming --------------------------------------------------------------------------------------

    def _next_good(self, stream: _SetStream) -> tuple[str, Any, str]:
        """Consume the set's plan up to its next good sample, counting what is skipped on the way."""
        assert self._decoder is not None
        while True:
            if not stream.pending:
                self._top_up(stream)
                if not stream.pending:  # exhausted, and its last epoch end was consumed already
                    raise self._unreadable(stream)
            item = stream.pending.popleft()
            if item.kind == "damage":
                self._on_skip(item.skip, item.path)
                continue
            if item.kind == "epoch_end":
                if stream.cursor.good == 0:
                    raise self._unreadable(stream)
                stream.cursor = _Cursor(epoch=item.epoch + 1)
                continue
            stream.queued -= 1
            self._in_flight -= 1
            stream.cursor = _Cursor(item.epoch, item.shard, item.pos, stream.cursor.good)
            outcome = self._decoder.result(item.ticket)
            if outcome[0] == "skip":
                self._on_skip(SampleSkip(outcome[1], outcome[2]), item.path)
                self._top_up(stream)  # its replacement: the sample the stream reads next
                continue
            stream.cursor.good += 1
            return outcome[1], outcome[2], outcome[3]

    def _unreadable(self, stream: _SetStream) -> DataError:
        return DataError(
            f"shard set {stream.index} ({stream.shards[0]} …, {len(stream.shards)} shards): no readable "
            f"sample in a full pass on rank {self.rank} (skipped so far: {dict(self.skipped)})"
        )

    # state ------------------------------------------------------------------------------------------

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
            stream.cursor = _Cursor(saved["epoch"], saved["shard"], saved["pos"], saved["good"])
        self.samples_yielded = state["samples_yielded"]
        self.skipped.clear()
        self.skipped.update(state["skipped"])
        self._restart_plan()

    def close(self) -> None:
        """Stop the workers, close open tars; samples decoded ahead are dropped (and decoded again later)."""
        if self._decoder is not None:
            self._decoder.close()
            self._decoder = None
        self._restart_plan()
