"""Per-rank batch streams for both stages, exactly resumable from a small JSON state.

Stage 1: the shard mixture (``mgpt4.data.shards.ShardMixture``), captions through ``blip_caption``
plus ``"\\n"`` (MG stage-1 ``end_sym``), no text prompt.
Stage 2: the aligned set in a seeded per-epoch permutation (each rank takes every world_size-th
item, like ``DistributedSampler``), answer + the preset's end symbol, and one alignment instruction
drawn per batch in the stage-2 template, as MG does.

Batches are assembled in the training process (no DataLoader workers) because the resume state lives
in these objects. On a GPU machine ``Prefetched`` builds the next batches on a background thread while
the model steps (JPEG decoding and PIL resizing release the GIL), and hands each batch over together
with the stream state *after* it, so a checkpoint still resumes at exactly the first batch not yet
trained on.
"""

from __future__ import annotations

import collections
import copy
import logging
import queue
import random
import threading
from typing import Any

import torch

from mgpt4.conversation import draw_instruction, stage2_prompt
from mgpt4.data.aligned import AlignedDataset
from mgpt4.data.shards import ShardMixture, blip_caption, find_shards
from mgpt4.errors import DataError
from mgpt4.model.presets import Preset
from mgpt4.model.vision import image_transform
from mgpt4.train.config import TrainRunConfig

log = logging.getLogger("mgpt4.train")

STAGE1_END = "\n"  # MG minigpt4.py default end_sym


class CaptionBatches:
    """Stage 1: endless micro batches from the shard mixture."""

    def __init__(self, cfg: TrainRunConfig, preset: Preset, rank: int, world_size: int) -> None:
        sets = [(find_shards(s.path), s.ratio) for s in cfg.data.shards]
        self.mixture = ShardMixture(
            sets,
            seed=cfg.train.seed,
            rank=rank,
            world_size=world_size,
            transform=image_transform(preset.vision.image_size),
            text_processor=blip_caption,
        )
        self.batch_size = cfg.data.micro_batch_size

    def next_batch(self) -> dict[str, Any]:
        samples = [self.mixture.next_sample() for _ in range(self.batch_size)]
        return {
            "image": torch.stack([s["image"] for s in samples]),
            "text": [s["text"] + STAGE1_END for s in samples],
        }

    @property
    def skipped(self) -> dict[str, int]:
        return dict(self.mixture.skipped)

    def state_dict(self) -> dict[str, Any]:
        return {"mixture": self.mixture.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mixture.load_state_dict(state["mixture"])


class InstructionBatches:
    """Stage 2: epochs over the aligned set, one instruction drawn per batch."""

    def __init__(self, cfg: TrainRunConfig, preset: Preset, rank: int, world_size: int) -> None:
        self.dataset = AlignedDataset(cfg.data.aligned, image_transform(preset.vision.image_size))
        self.batch_size = cfg.data.micro_batch_size
        self.seed, self.rank, self.world_size = cfg.train.seed, rank, world_size
        self.template, self.end_sym = preset.stage2_template, preset.stage2_end_sym
        self.epoch, self.position = 0, 0
        self.instruction_rng = random.Random(f"instructions:{cfg.train.seed}:{rank}")
        self._skipped: collections.Counter = collections.Counter()
        self._unreadable: dict[int, str] = {}  # dataset index -> why, found so far on this rank
        self._order = self._epoch_order()

    def _epoch_order(self) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        order = torch.randperm(len(self.dataset), generator=generator).tolist()
        mine = order[self.rank :: self.world_size]
        return mine or order[:1]  # more ranks than items: reuse one rather than starve

    def _next_index(self) -> int:
        if self.position >= len(self._order):
            self.epoch, self.position = self.epoch + 1, 0
            self._order = self._epoch_order()
        index = self._order[self.position]
        self.position += 1
        return index

    def _next_item(self) -> dict[str, Any]:
        """The next readable item; an unreadable image is skipped and counted, never fatal.

        Only a set in which no image at all can be read fails. An image found unreadable is not read
        again (the files do not change during a run), so skipping costs nothing after the first time.
        """
        while len(self._unreadable) < len(self.dataset):
            index = self._next_index()
            if index not in self._unreadable:
                try:
                    return self.dataset[index]
                except DataError as exc:
                    self._unreadable[index] = str(exc)
                    log.warning("skipped: %s", exc)
            self._skipped["bad_image"] += 1
        first = next(iter(self._unreadable.values()))
        raise DataError(
            f"{self.dataset.root}: none of its {len(self.dataset)} images can be read (first: {first}); "
            "fix or replace the images"
        )

    def next_batch(self) -> dict[str, Any]:
        items = [self._next_item() for _ in range(self.batch_size)]
        prompt = stage2_prompt(draw_instruction(self.instruction_rng), self.template)
        return {
            "image": torch.stack([item["image"] for item in items]),
            "text": [item["text"] + self.end_sym for item in items],
            "prompt": [prompt] * len(items),
        }

    @property
    def skipped(self) -> dict[str, int]:
        return dict(self._skipped)

    def state_dict(self) -> dict[str, Any]:
        version, internal, gauss = self.instruction_rng.getstate()
        return {"epoch": self.epoch, "position": self.position, "rng": [version, list(internal), gauss],
                "skipped": dict(self._skipped)}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.position = state["epoch"], state["position"]
        self._skipped = collections.Counter(state.get("skipped", {}))
        version, internal, gauss = state["rng"]
        self.instruction_rng.setstate((version, tuple(internal), gauss))
        self._order = self._epoch_order()


def make_batches(
    cfg: TrainRunConfig, preset: Preset, rank: int, world_size: int
) -> CaptionBatches | InstructionBatches:
    """The batch stream for ``cfg.stage``."""
    if cfg.stage == 1:
        return CaptionBatches(cfg, preset, rank, world_size)
    return InstructionBatches(cfg, preset, rank, world_size)


def make_prefetched_batches(cfg: TrainRunConfig, preset: Preset, rank: int, world_size: int) -> Prefetched:
    """``make_batches``, built ahead on a background thread when the model steps on a GPU.

    On a CPU-only machine the step already keeps every core busy: measured on 2 cores (micro
    stage 1, 300 steps), a prefetch thread made the run 6-14% slower, so there it stays off.
    """
    depth = 2 if torch.cuda.is_available() else 0
    return Prefetched(make_batches(cfg, preset, rank, world_size), depth=depth)


class Prefetched:
    """Wraps a batch stream: up to ``depth`` batches are built ahead on a daemon thread (0: none).

    ``state_dict`` and ``skipped`` describe the batches handed out so far, not the ones built ahead,
    so checkpoints are the same as without prefetching. ``load_state_dict`` must come before the
    first ``next_batch``. An error while building a batch is raised by the ``next_batch`` that
    would have returned it.
    """

    def __init__(self, batches: CaptionBatches | InstructionBatches, depth: int = 2) -> None:
        self.batches = batches
        self.depth = depth
        self._state = copy.deepcopy(batches.state_dict())
        self._skipped = batches.skipped
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()

    def _produce(self) -> None:
        while not self._stop.is_set():
            try:
                item = (self.batches.next_batch(), copy.deepcopy(self.batches.state_dict()),
                        self.batches.skipped)  # fmt: skip
            except BaseException as exc:  # noqa: BLE001 - re-raised in the training thread
                item = exc
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item, BaseException):
                return

    def next_batch(self) -> dict[str, Any]:
        if self.depth == 0:
            return self.batches.next_batch()
        if self._queue is None:
            self._queue = queue.Queue(maxsize=self.depth)
            threading.Thread(target=self._produce, name="mgpt4-batches", daemon=True).start()
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        batch, self._state, self._skipped = item
        return batch

    def close(self) -> None:
        """Stop the producer thread (batches built ahead are dropped)."""
        self._stop.set()

    @property
    def skipped(self) -> dict[str, int]:
        return self.batches.skipped if self.depth == 0 else dict(self._skipped)

    def state_dict(self) -> dict[str, Any]:
        return self.batches.state_dict() if self.depth == 0 else copy.deepcopy(self._state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self._queue is not None:
            raise RuntimeError("load_state_dict after prefetching started")  # the thread holds the stream
        self.batches.load_state_dict(state)
        self._state = copy.deepcopy(self.batches.state_dict())
        self._skipped = self.batches.skipped
