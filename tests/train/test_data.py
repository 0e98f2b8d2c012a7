"""Per-rank batch streams: exact resume from their JSON state; bad samples skipped and counted."""

from __future__ import annotations

import json

import pytest
import torch
from helpers.train_data import write_shape_aligned, write_shape_shards

from mgpt4.config import ModelConfig, load_config
from mgpt4.conversation import STAGE2_TEMPLATE
from mgpt4.errors import DataError
from mgpt4.model.build import build_model
from mgpt4.model.presets import get_preset
from mgpt4.train.config import TrainRunConfig
from mgpt4.train.data import Prefetched, make_batches
from mgpt4.train.engine import _param_groups

PRESET = get_preset("micro")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_data")
    return write_shape_shards(root / "shards", 24, per_shard=8), write_shape_aligned(root / "aligned", 7)


def _config(stage: int, data, rank_batch: int = 3) -> TrainRunConfig:
    shards, aligned = data
    recipe = "micro_stage1" if stage == 1 else "micro_stage2"
    overrides = [f"data.shards=[{{path: {shards}}}]", f"data.aligned={aligned}",
                 f"data.micro_batch_size={rank_batch}"]  # fmt: skip
    return load_config(TrainRunConfig, recipe, overrides)


def _key(batch) -> list:
    return [batch["text"], batch.get("prompt"), batch["image"].sum().item()]


@pytest.mark.parametrize("stage", [1, 2])
def test_resume_continues_the_same_stream(stage, data):
    cfg = _config(stage, data)
    straight = make_batches(cfg, PRESET, 0, 1)
    expected = [_key(straight.next_batch()) for _ in range(6)]
    first = make_batches(cfg, PRESET, 0, 1)
    for _ in range(2):
        first.next_batch()
    state = json.loads(json.dumps(first.state_dict()))  # it is stored as JSON
    resumed = make_batches(cfg, PRESET, 0, 1)
    resumed.load_state_dict(state)
    assert [_key(resumed.next_batch()) for _ in range(4)] == expected[2:]


@pytest.mark.parametrize(("stage", "depth"), [(1, 3), (2, 3), (1, 0), (2, 0)])
def test_prefetched_stream_checkpoints_what_was_handed_out(stage, depth, data):
    cfg = _config(stage, data)
    straight = make_batches(cfg, PRESET, 0, 1)
    expected = [_key(straight.next_batch()) for _ in range(6)]
    ahead = Prefetched(make_batches(cfg, PRESET, 0, 1), depth=depth)
    assert [_key(ahead.next_batch()) for _ in range(2)] == expected[:2]
    state = json.loads(json.dumps(ahead.state_dict()))  # taken while later batches were built ahead
    ahead.close()
    resumed = Prefetched(make_batches(cfg, PRESET, 0, 1), depth=depth)
    resumed.load_state_dict(state)
    assert [_key(resumed.next_batch()) for _ in range(4)] == expected[2:]
    resumed.close()


def test_prefetched_stream_raises_a_build_error_in_the_caller(data):
    class Broken:
        skipped: dict = {}

        def state_dict(self):
            return {}

        def next_batch(self):
            raise DataError("shard-000.tar: truncated")

    stream = Prefetched(Broken())
    with pytest.raises(DataError, match="truncated"):
        stream.next_batch()


def test_stage_texts(data):
    stage1 = make_batches(_config(1, data), PRESET, 0, 1).next_batch()
    assert all(t.endswith("\n") and t == t.lower() for t in stage1["text"]) and "prompt" not in stage1
    stage2 = make_batches(_config(2, data), PRESET, 0, 1).next_batch()
    assert all(t.endswith("###") for t in stage2["text"])
    assert len(set(stage2["prompt"])) == 1  # one instruction per batch, as officially
    before, after = STAGE2_TEMPLATE.split("{}")
    prompt = stage2["prompt"][0]
    assert prompt.startswith(before + "<Img><ImageHere></Img> ") and prompt.endswith(after)


def test_ranks_split_an_aligned_epoch(data):
    cfg = _config(2, data, rank_batch=1)
    seen = [[make_batches(cfg, PRESET, r, 2)] for r in range(2)]
    texts = [[s[0].next_batch()["text"][0] for _ in range(3)] for s in seen]
    assert not set(texts[0]) & set(texts[1])


def test_unreadable_aligned_image_is_skipped_and_counted(tmp_path):
    aligned = write_shape_aligned(tmp_path / "aligned", 4)
    victim = sorted((aligned / "image").glob("*.jpg"))[0]
    victim.write_bytes(b"not a jpeg")
    cfg = _config(2, (tmp_path, aligned), rank_batch=4)
    batches = make_batches(cfg, PRESET, 0, 1)
    for _ in range(2):
        assert len(batches.next_batch()["text"]) == 4
    # 8 items from 3 readable ones per epoch: the bad image is met once in each epoch it reaches.
    assert batches.skipped["bad_image"] in (2, 3)
    assert batches.state_dict()["skipped"] == batches.skipped


@pytest.mark.parametrize("rank", [0, 1])
def test_half_unreadable_aligned_set_is_skipped_not_fatal(rank, tmp_path):
    aligned = write_shape_aligned(tmp_path / "aligned", 4)
    annotations = json.loads((aligned / "filter_cap.json").read_text())["annotations"]
    for annotation in annotations[:2]:
        (aligned / "image" / f"{annotation['image_id']}.jpg").write_bytes(b"not a jpeg")
    readable = {annotation["caption"] + PRESET.stage2_end_sym for annotation in annotations[2:]}
    # Two ranks: each takes 2 of the 4 items an epoch, so both of a rank's items are often unreadable
    # for several epochs running; that must never end training while readable images exist.
    batches = make_batches(_config(2, (tmp_path, aligned), rank_batch=4), PRESET, rank, 2)
    texts = [text for _ in range(30) for text in batches.next_batch()["text"]]
    assert set(texts) <= readable and len(texts) == 120
    assert batches.skipped["bad_image"] >= 60  # about one skip per readable item drawn


def test_aligned_set_without_a_readable_image_fails_naming_it(tmp_path):
    aligned = write_shape_aligned(tmp_path / "aligned", 3)
    for image in (aligned / "image").glob("*.jpg"):
        image.write_bytes(b"not a jpeg")
    batches = make_batches(_config(2, (tmp_path, aligned), rank_batch=2), PRESET, 0, 1)
    with pytest.raises(DataError, match=f"{aligned}: none of its 3 images can be read"):
        batches.next_batch()


def test_weight_decay_groups_follow_the_official_rule():
    model = build_model(ModelConfig(preset="micro", trainable=["proj", "qformer"], grad_checkpointing=False))
    decay, no_decay = _param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert "llama_proj.weight" in {names[id(p)] for p in decay["params"]}
    assert "llama_proj.bias" in {names[id(p)] for p in no_decay["params"]}
    assert all(p.ndim >= 2 for p in decay["params"])
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == sum(
        p.numel() for p in model.parameters() if p.requires_grad
    )
    assert torch.is_grad_enabled()
