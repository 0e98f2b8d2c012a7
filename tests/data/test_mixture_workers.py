"""The shard mixture decoded in worker processes: the same samples, order, skip counts and resume state as
decoding in this process; a dead worker is one DataError; workers stop with the mixture."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time

import numpy as np
import pytest
import torch

from mgpt4.data.decode_pool import DecodePool
from mgpt4.data.mixture import ShardMixture
from mgpt4.data.shards import blip_caption
from mgpt4.errors import DataError
from tests.data.test_shards import to_tensor, write_shard


@pytest.fixture()
def damaged_sets(tmp_path):
    """Three sets: bad samples of every kind, a truncated + an unreadable tar, and a clean-ish set."""
    plain = tmp_path / "00000.tar"
    write_shard(plain, 8, bad={1: "bad_image", 2: "missing_caption", 3: "missing_image", 4: "txt_only"})
    truncated, garbage = tmp_path / "00001.tar", tmp_path / "00002.tar"
    write_shard(truncated, 6, prefix="t-")
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    garbage.write_bytes(b"this is not a tar file" * 40)
    mostly_good = [tmp_path / f"a{i}.tar" for i in range(3)]
    for i, path in enumerate(mostly_good):
        write_shard(path, 7, prefix=f"a{i}-", bad={2: "bad_image"} if i == 1 else None)
    return [([str(plain)], 1), ([str(truncated), str(garbage)], 1), ([str(p) for p in mostly_good], 3)]


def build(sets, workers: int, prefetch: int = 8, rank: int = 0, world_size: int = 1,
          transform=to_tensor) -> ShardMixture:  # fmt: skip
    return ShardMixture(sets, seed=3, rank=rank, world_size=world_size, transform=transform,
                        text_processor=blip_caption, num_workers=workers, prefetch=prefetch)  # fmt: skip


def stream(mixture: ShardMixture, n: int) -> list:
    """Each sample with the (JSON) state after it: key, text, pixels, position and skip counters."""
    out = []
    for _ in range(n):
        sample = mixture.next_sample()
        pixels = np.ascontiguousarray(np.asarray(sample["image"])).tobytes()  # a tensor or a PIL image
        out.append((sample["key"], sample["text"], hashlib.sha1(pixels).hexdigest(),
                    json.dumps(mixture.state_dict())))  # fmt: skip
    return out


# A fixed-shape tensor travels through shared slots, a PIL image through the result queue.
@pytest.mark.parametrize("transform", [to_tensor, None], ids=["tensor-slots", "pil-queue"])
def test_workers_yield_what_the_training_process_decodes_with_the_same_counts(damaged_sets, transform):
    here = build(damaged_sets, workers=0, transform=transform)
    expected = stream(here, 90)  # several epochs of every set, each kind of damage met repeatedly
    workers = build(damaged_sets, workers=2, prefetch=5, transform=transform)
    try:
        assert stream(workers, 90) == expected
        assert len(workers.worker_pids) == 2
        assert workers.skipped == here.skipped
    finally:
        workers.close()
    counts = json.loads(expected[-1][3])["skipped"]
    assert set(counts) == {
        "bad_image",
        "missing_caption",
        "missing_image",
        "truncated_shard",
        "unreadable_shard",
    }


@pytest.mark.parametrize("world_size", [2, 3])  # 3 ranks > 2 shards of the second set: ranks split samples
def test_each_rank_decodes_its_own_share_in_workers(tmp_path, world_size):
    first = [tmp_path / f"a{i}.tar" for i in range(4)]
    for i, path in enumerate(first):
        write_shard(path, 6, prefix=f"a{i}-", bad={2: "bad_image"} if i == 1 else None)
    second = [tmp_path / f"b{i}.tar" for i in range(2)]
    for i, path in enumerate(second):
        write_shard(path, 9, prefix=f"b{i}-", bad={4: "missing_caption"})
    sets = [([str(p) for p in first], 2), ([str(p) for p in second], 1)]
    for rank in range(world_size):
        expected = stream(build(sets, workers=0, rank=rank, world_size=world_size), 40)
        workers = build(sets, workers=2, rank=rank, world_size=world_size)
        try:
            assert stream(workers, 40) == expected
        finally:
            workers.close()


def test_resume_across_worker_counts_is_exact(damaged_sets):
    expected = stream(build(damaged_sets, workers=0), 60)
    first = build(damaged_sets, workers=3, prefetch=11)  # decodes up to 11 samples past the checkpoint
    try:
        head = stream(first, 25)
    finally:
        first.close()
    state = json.loads(head[-1][3])
    assert state["samples_yielded"] == 25  # samples handed out, not samples decoded ahead
    for workers in (0, 2):
        resumed = build(damaged_sets, workers=workers)
        resumed.load_state_dict(state)
        try:
            assert head + stream(resumed, 35) == expected
        finally:
            resumed.close()


def test_a_set_without_readable_samples_fails_the_same_way_with_workers(tmp_path):
    bad, good = tmp_path / "00000.tar", tmp_path / "00001.tar"
    write_shard(bad, 3, bad={0: "bad_image", 1: "missing_image", 2: "bad_image"})
    write_shard(good, 3)
    messages = []
    for workers in (0, 2):
        mixture = build([([str(good)], 1), ([str(bad)], 1)], workers=workers)
        with pytest.raises(DataError, match=r"00000\.tar.*no readable sample") as caught:
            stream(mixture, 50)
        mixture.close()
        messages.append(str(caught.value))
    assert messages[0] == messages[1]  # the skip counts in it included


def test_a_killed_worker_is_one_data_error_and_the_rest_stop(damaged_sets):
    mixture = build(damaged_sets, workers=2)
    stream(mixture, 3)
    victim, other = mixture.worker_pids
    os.kill(victim, signal.SIGKILL)
    with pytest.raises(DataError) as caught:
        stream(mixture, 200)
    message = str(caught.value)
    assert f"(pid {victim}) was killed by SIGKILL" in message and "\n" not in message
    assert "rerun the same command to resume" in message and "data.num_workers=0" in message
    deadline = time.monotonic() + 10
    while _alive(other) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(other)


def test_close_stops_the_workers_and_the_stream_continues_after_it(damaged_sets):
    expected = stream(build(damaged_sets, workers=0), 30)
    mixture = build(damaged_sets, workers=2)
    head = stream(mixture, 10)
    pids = mixture.worker_pids
    mixture.close()
    assert not any(_alive(pid) for pid in pids)
    try:
        assert head + stream(mixture, 20) == expected  # new workers, same stream
        assert set(mixture.worker_pids).isdisjoint(pids)
    finally:
        mixture.close()


def test_a_dataloader_worker_is_refused_with_the_way_to_decode_in_workers(damaged_sets):
    loader = torch.utils.data.DataLoader(build(damaged_sets, workers=0), batch_size=2, num_workers=1)
    with pytest.raises(Exception, match="give the mixture num_workers"):
        next(iter(loader))


def _image_and_label(task: int) -> tuple:
    return torch.full((3, 4, 4), float(task)), f"item {task}", torch.arange(task + 1)  # the last: no slot


def test_the_pool_answers_by_ticket_with_fewer_slots_than_tasks():
    pool = DecodePool(_image_and_label, workers=2, slot_like=torch.zeros(3, 4, 4), slots=2)
    try:
        for ticket in range(10):
            pool.submit(ticket, ticket)  # 2 go out, 8 wait for a free slot
        for ticket in [*range(9, 4, -1), *range(5)]:  # asked for in another order than submitted
            image, label, extra = pool.result(ticket)
            assert torch.equal(image, torch.full((3, 4, 4), float(ticket))) and label == f"item {ticket}"
            assert torch.equal(extra, torch.arange(ticket + 1)) and not image.is_shared()
        pool.submit(10, 10)
        pool.forget()  # a resume: what is still coming is dropped
        pool.submit(11, 11)
        assert pool.result(11)[1] == "item 11"
    finally:
        pool.close()


def test_slots_larger_than_the_free_shared_memory_are_refused_in_one_line(damaged_sets, monkeypatch):
    real_statvfs = os.statvfs

    def small_shm(path):  # a Docker container's default 64 MiB /dev/shm, 0.5 MiB of it free
        stats = real_statvfs(path)
        return os.statvfs_result((4096, 4096, 16384, 128, 128, *tuple(stats)[5:]))

    monkeypatch.setattr(os, "statvfs", small_shm)
    mixture = build(damaged_sets, workers=2, prefetch=200)  # 202 slots of 3x16x16 floats: 0.6 MiB
    expected = r"need 0\.6 MiB of shared memory, /dev/shm has 0\.5 MiB free.*--shm-size"
    with pytest.raises(DataError, match=expected):
        mixture.next_sample()
    assert mixture.worker_pids == []  # refused before any worker started
    mixture.close()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False
