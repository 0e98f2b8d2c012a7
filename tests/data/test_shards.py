"""WebDataset shards: finding them, the official caption processor, and the resumable mixture."""

from __future__ import annotations

import collections
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from mgpt4.data.images import ImageReadError, shard_sources
from mgpt4.data.mixture import ShardMixture
from mgpt4.data.shards import blip_caption, find_shards, iter_shard_images
from mgpt4.errors import DataError, UsageError
from tests.helpers.bad_images import BIG_BOMB, bomb_png, write_damaged_shards


def _jpeg(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (value % 256, 80, 160)).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def write_shard(path, keys, *, prefix="", bad=None, stats=True, order=None) -> list[str]:
    """An img2dataset-style shard: KEY.jpg, KEY.txt, KEY.json; ``bad`` maps key index → damage;
    ``order``: the key indexes in the order they are written (default: ascending)."""
    bad = bad or {}
    written = []
    with wds.TarWriter(str(path)) as sink:
        for i in range(keys) if order is None else order:
            key = f"{prefix}{i:09d}"
            caption = f"Caption {prefix}{i}: A Photo!"
            meta = {"key": key, "url": f"http://x/{key}.jpg", "caption": caption, "status": "success"}
            sample = {"__key__": key, "jpg": _jpeg(i), "txt": caption, "json": json.dumps(meta).encode()}
            damage = bad.get(i)
            if damage == "bad_image":
                sample["jpg"] = b"\xff\xd8 not a jpeg"
            elif damage == "bomb":
                sample["jpg"] = bomb_png(*BIG_BOMB)
            elif damage == "missing_caption":
                del sample["txt"]
                sample["json"] = json.dumps({"key": key, "caption": None}).encode()
            elif damage == "missing_image":
                del sample["jpg"]
            elif damage == "txt_only":
                sample["json"] = b"{broken"
                sample["txt"] = f"from txt {i}"
            sink.write(sample)
            if damage in (None, "txt_only"):
                written.append(key)
    if stats:
        with open(str(path)[: -len(".tar")] + "_stats.json", "w") as f:
            json.dump({"count": keys}, f)
    return written


def to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 255


def one_pass(shard) -> tuple[list[str], collections.Counter]:
    """The keys the image source opens in one shard, and how often each kind of failure is reported."""
    opened, failures = [], collections.Counter()
    for source in shard_sources(str(shard)):
        try:
            source.open()
            opened.append(source.key)
        except ImageReadError as exc:
            failures[exc.reason.split(" (")[0] if source.error is None else source.error.split(" (")[0]] += 1
    return sorted(opened), failures


def take(mixture, n):
    stream = iter(mixture)
    return [next(stream) for _ in range(n)]


@pytest.fixture()
def two_sets(tmp_path):
    a_dir, b_dir = tmp_path / "laion", tmp_path / "cc_sbu"
    a_dir.mkdir()
    b_dir.mkdir()
    a = [str(a_dir / f"{i:05d}.tar") for i in range(3)]
    b = [str(b_dir / "00000.tar")]
    for i, path in enumerate(a):
        write_shard(path, 7, prefix=f"a{i}-", bad={2: "bad_image"} if i == 1 else None)
    write_shard(b[0], 5, prefix="b-", bad={1: "missing_caption"})
    return a, b


def test_blip_caption_matches_official():
    assert blip_caption('A "Dog" (running): fast!!  on #grass~;*') == "a dog running fast on grass"
    assert blip_caption("  Hello.World  ") == "hello world"
    assert blip_caption(" ".join(f"w{i}" for i in range(60))) == " ".join(f"w{i}" for i in range(50))
    assert blip_caption("one two three", max_words=2) == "one two"
    assert blip_caption("keep\ta single tab") == "keep\ta single tab"  # upstream collapses only runs


def test_find_shards(tmp_path):
    for i in range(3):
        write_shard(tmp_path / f"{i:05d}.tar", 1, stats=i != 1)  # 00001 is still being written
    names = [os.path.basename(p) for p in find_shards(tmp_path)]
    assert names == ["00000.tar", "00002.tar"]
    assert len(find_shards(str(tmp_path / "*.tar"))) == 3
    assert [os.path.basename(p) for p in find_shards(str(tmp_path / "{00001..00005}.tar"))] == [
        "00001.tar",
        "00002.tar",
    ]
    assert find_shards(tmp_path / "00002.tar") == [str(tmp_path / "00002.tar")]
    for stats in tmp_path.glob("*_stats.json"):
        stats.unlink()
    assert len(find_shards(tmp_path)) == 3  # no stats files at all: every tar counts
    with pytest.raises(UsageError, match="nowhere"):
        find_shards(tmp_path / "nowhere")
    with pytest.raises(UsageError, match="no shards found"):
        find_shards(str(tmp_path / "{00007..00009}.tar"))


def test_samples_are_decoded_and_processed(two_sets):
    a, b = two_sets
    mixture = ShardMixture([(a, 1), (b, 1)], seed=0, transform=to_tensor, text_processor=blip_caption)
    for sample in take(mixture, 20):
        assert set(sample) == {"image", "text", "key"}
        assert sample["image"].shape == (3, 16, 16)
        prefix, index = sample["key"].rsplit("-", 1)
        assert sample["text"] == f"caption {prefix}-{int(index)} a photo"


def test_mixing_ratio_and_determinism(two_sets):
    a, b = two_sets
    keys = [s["key"] for s in take(ShardMixture([(a, 3), (b, 1)], seed=5), 400)]
    share = sum(k.startswith("a") for k in keys) / len(keys)
    assert 0.68 < share < 0.82
    assert keys == [s["key"] for s in take(ShardMixture([(a, 3), (b, 1)], seed=5), 400)]
    assert keys != [s["key"] for s in take(ShardMixture([(a, 3), (b, 1)], seed=6), 400)]


def test_epochs_cover_every_good_sample_once_in_shuffled_order(tmp_path):
    shards = [str(tmp_path / f"{i:05d}.tar") for i in range(3)]
    good = [k for i, s in enumerate(shards) for k in write_shard(s, 6, prefix=f"s{i}-")]
    keys = [s["key"] for s in take(ShardMixture([(shards, 1)], seed=1), 36)]
    first, second = keys[:18], keys[18:]
    assert sorted(first) == sorted(good) and sorted(second) == sorted(good)
    assert first != sorted(good) and first != second  # shuffled, differently per epoch


def test_the_stream_does_not_depend_on_the_order_a_downloader_wrote_the_tar_in(tmp_path):
    # A downloader writes samples as their fetches complete: the same rows twice make differently
    # ordered tars, and a seeded run must still see the same samples in the same order.
    orders = {"ascending": None, "as_fetched": [3, 0, 5, 1, 4, 2]}
    streams = {}
    for name, order in orders.items():
        (tmp_path / name).mkdir()
        shard = str(tmp_path / name / "00000.tar")
        write_shard(shard, 6, order=order)
        streams[name] = [s["key"] for s in take(ShardMixture([([shard], 1)], seed=3), 18)]
    assert streams["as_fetched"] == streams["ascending"]


@pytest.mark.parametrize("world_size,num_shards", [(2, 4), (2, 1), (3, 2)])
def test_ranks_get_disjoint_streams(tmp_path, world_size, num_shards):
    shards = [str(tmp_path / f"{i:05d}.tar") for i in range(num_shards)]
    good = [k for i, s in enumerate(shards) for k in write_shard(s, 6, prefix=f"s{i}-")]
    per_rank = []
    for rank in range(world_size):
        mixture = ShardMixture([(shards, 1)], seed=0, rank=rank, world_size=world_size)
        keys = []
        while mixture.streams[0].cursor.epoch == 0:  # exactly one epoch of this rank's share
            keys.append(mixture.next_sample()["key"])
        per_rank.append(keys[:-1])  # the last one already belongs to epoch 1
    assert sum(len(k) for k in per_rank) == len(good)
    assert sorted(k for keys in per_rank for k in keys) == sorted(good)


@pytest.mark.parametrize("rank,world_size", [(0, 1), (1, 2)])
def test_resume_is_exact(two_sets, rank, world_size):
    a, b = two_sets

    def build():
        return ShardMixture(
            [(a, 2), (b, 1)],
            seed=3,
            rank=rank,
            world_size=world_size,
            transform=to_tensor,
            text_processor=blip_caption,
        )

    full = take(build(), 50)  # several epochs of both sets, with bad samples on the way
    first = build()
    take(first, 20)
    state = json.loads(json.dumps(first.state_dict()))  # JSON-able
    resumed = build()
    resumed.load_state_dict(state)
    rest = take(resumed, 30)
    assert [s["key"] for s in rest] == [s["key"] for s in full[20:]]
    assert [s["text"] for s in rest] == [s["text"] for s in full[20:]]
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(rest, full[20:], strict=True))
    uninterrupted = build()
    take(uninterrupted, 50)
    assert resumed.state_dict() == uninterrupted.state_dict()  # counters included


def test_resume_rejects_a_different_mixture(two_sets):
    a, b = two_sets
    state = ShardMixture([(a, 1), (b, 1)]).state_dict()
    with pytest.raises(UsageError, match="does not fit"):
        ShardMixture([(a, 1)]).load_state_dict(state)


def test_bad_samples_are_skipped_and_counted(tmp_path):
    shard = tmp_path / "00000.tar"
    damage = {1: "bad_image", 2: "missing_caption", 3: "missing_image", 4: "txt_only"}
    good = write_shard(shard, 8, bad=damage)
    truncated = tmp_path / "00001.tar"
    write_shard(truncated, 6, prefix="t-")
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "00002.tar"
    garbage.write_bytes(b"this is not a tar file" * 40)

    mixture = ShardMixture([([str(shard)], 1), ([str(truncated), str(garbage)], 1)], seed=0)
    samples = take(mixture, 40)
    keys = collections.Counter(s["key"] for s in samples)
    assert set(keys) - set(good) <= {f"t-{i:09d}" for i in range(6)}
    assert {s["text"] for s in samples if s["key"] == "000000004"} == {"from txt 4"}
    assert mixture.skipped["bad_image"] >= 1 and mixture.skipped["missing_caption"] >= 1
    assert mixture.skipped["missing_image"] >= 1
    assert mixture.skipped["truncated_shard"] >= 1 and mixture.skipped["unreadable_shard"] >= 1
    # One pass of the image source (describe, curate, eval) over the plain shard reports each image
    # damage exactly once, in line; it needs no caption, so the caption-less sample opens.
    opened, failures = one_pass(shard)
    assert opened == sorted([*good, "000000002"])
    assert failures == {"cannot read image": 1, "no image member": 1}


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_a_bomb_member_is_a_skipped_bad_image(tmp_path):
    shard = tmp_path / "00000.tar"
    good = write_shard(shard, 3, bad={1: "bomb"})
    opened, failures = one_pass(shard)
    assert opened == good and failures == {"cannot read image": 1}


def test_iter_shard_images_reports_every_failure_in_line(tmp_path):
    shards = write_damaged_shards(tmp_path / "shards")
    samples = list(iter_shard_images(find_shards(str(shards))))
    got = [(Path(s.shard).stem, s.key, s.error is None) for s in samples]
    assert got == [
        ("00000", "a0", True), ("00000", "a1", True),
        ("00001", "b0", True), ("00001", "b1", True), ("00001", "b2", True), ("00001", "b3", True),
        ("00002", "c0", True), ("00002", "c1", False), ("00002", "", False),
        ("00003", "", False),
    ]  # fmt: skip
    assert all(s.data for s in samples if s.error is None)  # undecoded: garbage and bombs fail when opened
    assert "c1.jpg" in samples[7].error
    assert samples[8].error.startswith("truncated shard") and samples[9].error.startswith("unreadable shard")


def test_a_set_without_readable_samples_raises(tmp_path):
    bad = tmp_path / "00000.tar"
    write_shard(bad, 3, bad={0: "bad_image", 1: "missing_image", 2: "bad_image"})
    good = tmp_path / "00001.tar"
    write_shard(good, 3)
    mixture = ShardMixture([([str(good)], 1), ([str(bad)], 1)], seed=0)
    with pytest.raises(DataError, match=r"00000\.tar.*no readable sample"):
        take(mixture, 50)
    assert mixture.skipped["bad_image"] == 2


def test_invalid_mixtures_are_usage_errors(two_sets):
    a, _ = two_sets
    with pytest.raises(UsageError, match="ratio"):
        ShardMixture([(a, 0)])
    with pytest.raises(UsageError, match="empty"):
        ShardMixture([([], 1)])
    with pytest.raises(UsageError, match="rank"):
        ShardMixture([(a, 1)], rank=2, world_size=2)


def test_works_with_a_dataloader(two_sets):
    a, b = two_sets
    mixture = ShardMixture([(a, 1), (b, 1)], transform=to_tensor)
    batch = next(iter(torch.utils.data.DataLoader(mixture, batch_size=4, num_workers=0)))
    assert batch["image"].shape == (4, 3, 16, 16) and len(batch["text"]) == 4
    assert mixture.samples_yielded == 4
