"""The cc_sbu_align layout: written atomically, read back raw, and every broken set refused clearly."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from mgpt4.data.aligned import AlignedDataset, read_annotations, rewrite_without, write_aligned
from mgpt4.errors import DataError, UsageError
from tests.helpers.bad_images import MIDDLE_BOMB, bomb_png


def _image(value: int) -> Image.Image:
    return Image.new("RGB", (24, 24), (value, 100, 200))


@pytest.fixture()
def aligned(tmp_path):
    jpg = tmp_path / "source.jpg"
    _image(10).save(jpg, quality=90)
    png = tmp_path / "source.png"
    _image(20).save(png)
    root = tmp_path / "aligned"
    items = [
        ("2", _image(30), "The image shows a red circle. It is round."),
        ("3", jpg, "A JPEG copied as it is!"),
        ("img_4", png, "A PNG re-encoded as JPEG."),
    ]
    write_aligned(root, items)
    return root, jpg


def test_layout_matches_cc_sbu_align(aligned):
    root, source_jpg = aligned
    assert sorted(p.name for p in root.iterdir()) == ["filter_cap.json", "image"]
    assert sorted(p.name for p in (root / "image").iterdir()) == ["2.jpg", "3.jpg", "img_4.jpg"]
    data = json.loads((root / "filter_cap.json").read_text())
    assert data == {
        "annotations": [
            {"image_id": "2", "caption": "The image shows a red circle. It is round."},
            {"image_id": "3", "caption": "A JPEG copied as it is!"},
            {"image_id": "img_4", "caption": "A PNG re-encoded as JPEG."},
        ]
    }
    assert (root / "image" / "3.jpg").read_bytes() == source_jpg.read_bytes()
    with Image.open(root / "image" / "img_4.jpg") as img:
        assert img.format == "JPEG"


def test_dataset_yields_raw_captions(aligned):
    root, _ = aligned
    dataset = AlignedDataset(root, transform=lambda img: np.asarray(img))
    assert len(dataset) == 3
    sample = dataset[0]
    assert set(sample) == {"image", "text", "image_id"}
    assert sample["text"] == "The image shows a red circle. It is round."  # no text processing in stage 2
    assert sample["image_id"] == "2" and sample["image"].shape == (24, 24, 3)
    assert abs(int(sample["image"][..., 0].mean()) - 30) <= 3
    assert AlignedDataset(root)[1]["image"].mode == "RGB"


def test_bare_list_and_integer_ids_are_accepted(tmp_path):
    root = tmp_path / "set"
    (root / "image").mkdir(parents=True)
    _image(5).save(root / "image" / "7.jpg")
    (root / "filter_cap.json").write_text(json.dumps([{"image_id": 7, "caption": "x", "extra": 1}]))
    assert read_annotations(root) == [{"image_id": "7", "caption": "x", "extra": 1}]
    assert AlignedDataset(root)[0]["image_id"] == "7"


def test_broken_sets_are_refused_by_name(tmp_path, aligned):
    root, _ = aligned
    with pytest.raises(UsageError, match="not found: .*nowhere"):
        AlignedDataset(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UsageError, match=r"empty/filter_cap\.json: not found"):
        AlignedDataset(empty)
    annotations = root / "filter_cap.json"
    for text, error, message in [
        ("{not json", DataError, "not valid JSON"),
        ('{"annotations": {"a": 1}}', DataError, "expected"),
        ('{"annotations": [{"caption": "x"}]}', DataError, "annotation 0 has no image_id"),
        ('{"annotations": [{"image_id": "2"}]}', DataError, "annotation 0 .image_id 2. has no caption"),
        ('{"annotations": []}', DataError, "no annotations"),
    ]:
        annotations.write_text(text)
        with pytest.raises(error, match=message):
            AlignedDataset(root)
    annotations.write_text(json.dumps([{"image_id": i, "caption": "c"} for i in ["2", "9", "3", "8"]]))
    with pytest.raises(DataError, match=r"2 of 4 images missing, first: .*image/9\.jpg"):
        AlignedDataset(root)


def test_damaged_image_is_a_data_error(aligned):
    root, _ = aligned
    (root / "image" / "3.jpg").write_bytes(b"not a jpeg")
    dataset = AlignedDataset(root)
    with pytest.raises(DataError, match=r"3\.jpg: cannot read image"):
        dataset[1]


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_images_over_the_pixel_cap_are_refused_before_decoding(aligned, tmp_path):
    root, _ = aligned
    # 100 M pixels: Pillow alone would decode this (it only warns below 179 M); the shared cap refuses it.
    (root / "image" / "2.jpg").write_bytes(bomb_png(*MIDDLE_BOMB))
    with pytest.raises(DataError, match=r"2\.jpg: cannot read image .*89,478,485-pixel limit"):
        AlignedDataset(root)[0]
    source = tmp_path / "huge.png"
    source.write_bytes(bomb_png(*MIDDLE_BOMB))
    with pytest.raises(DataError, match=r"huge\.png: cannot read image .*pixel limit"):
        write_aligned(tmp_path / "other", [("1", source, "a caption")])


def test_write_is_atomic_and_checks_ids(aligned, tmp_path):
    root, _ = aligned
    before = (root / "filter_cap.json").read_text()

    def failing_items():
        yield "5", _image(1), "fine"
        raise RuntimeError("curation crashed")

    with pytest.raises(RuntimeError):
        write_aligned(root, failing_items())
    assert (root / "filter_cap.json").read_text() == before  # old set still intact
    assert not [p for p in root.rglob("*") if p.name.startswith(".")]  # no temporary files left
    with pytest.raises(UsageError, match="duplicate image_id '1'"):
        write_aligned(tmp_path / "dup", [("1", _image(1), "a"), ("1", _image(2), "b")])
    with pytest.raises(UsageError, match="cannot be a file name"):
        write_aligned(tmp_path / "bad", [("../x", _image(1), "a")])
    with pytest.raises(UsageError, match="image not found"):
        write_aligned(tmp_path / "missing", [("1", tmp_path / "nope.jpg", "a")])


def test_rewrite_in_place_keeps_images(aligned):
    root, _ = aligned
    original = (root / "image" / "2.jpg").read_bytes()
    items = [(a["image_id"], root / "image" / f"{a['image_id']}.jpg", a["caption"] + " Fixed.")
             for a in read_annotations(root)]  # fmt: skip
    write_aligned(root, items)
    assert (root / "image" / "2.jpg").read_bytes() == original
    assert read_annotations(root)[0]["caption"].endswith("round. Fixed.")


def test_rewrite_without_drops_ids_and_images(aligned):
    root, _ = aligned
    assert rewrite_without(root, ["3", "unknown"]) == 1
    assert [a["image_id"] for a in read_annotations(root)] == ["2", "img_4"]
    assert not (root / "image" / "3.jpg").exists()
    assert len(AlignedDataset(root)) == 2
    assert rewrite_without(root, []) == 0
