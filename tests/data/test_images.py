"""The one image source (files, folders, globs, shards) and `open_image`, the one decoder behind describe,
chat, curate, eval and training, with one pixel cap."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from mgpt4.curate.images import iter_images
from mgpt4.data.images import (
    IMAGE_SUFFIXES,
    MAX_IMAGE_PIXELS,
    ImageReadError,
    expand_inputs,
    iter_sources,
    open_image,
)
from mgpt4.data.shards import IMAGE_EXTENSIONS
from mgpt4.infer.describe import collect_inputs
from tests.helpers.bad_images import (
    BIG_BOMB,
    MIDDLE_BOMB,
    bomb_png,
    png,
    write_bad_files,
    write_damaged_shards,
)

# mgpt4.data.images silences Pillow's warning (its own check refuses those images first); pytest
# resets warning filters per test, so restate that here.
pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")


def test_good_images_come_back_as_rgb(tmp_path):
    rgba = tmp_path / "a.png"
    Image.new("RGBA", (20, 10), (255, 0, 0, 128)).save(rgba)
    image = open_image(rgba)
    assert image.mode == "RGB" and image.size == (20, 10)
    # Same pixels as the official preprocessing's own first step, PIL open + convert("RGB").
    with Image.open(rgba) as reference:
        assert image.tobytes() == reference.convert("RGB").tobytes()
    assert open_image(png("blue")).getpixel((0, 0)) == (0, 0, 255)  # encoded bytes work too


def test_the_pixel_cap_is_checked_before_decoding():
    assert MAX_IMAGE_PIXELS == Image.MAX_IMAGE_PIXELS  # the limit Pillow itself warns at
    # Pillow raises over 2 × its limit and only warns in between: both are refused here, by name.
    for size, shown in ((BIG_BOMB, "400,000,000 pixels"), (MIDDLE_BOMB, "10000x10000 = 100,000,000 pixels")):
        message = f"bomb.png: cannot read image .{shown} > the 89,478,485-pixel limit"
        with pytest.raises(ImageReadError, match=message):
            open_image(bomb_png(*size), "bomb.png")
    just_over = bomb_png(MAX_IMAGE_PIXELS // 100 + 1, 100)
    with pytest.raises(ImageReadError, match="pixel limit"):
        open_image(just_over)


def test_every_kind_of_bad_file_is_one_image_read_error(tmp_path):
    files = write_bad_files(tmp_path)
    expected = {
        "empty": "not an image file",
        "text": "not an image file",
        "truncated": "truncated",
        "folder": "a folder, not an image file",
        "bomb": "pixel limit",
    }
    for name, fragment in expected.items():
        with pytest.raises(ImageReadError) as caught:
            open_image(files[name])
        message = str(caught.value)
        assert message.startswith(f"{files[name]}: cannot read image (") and fragment in message
        assert message.endswith(caught.value.reason) and "\n" not in message
    with pytest.raises(ImageReadError, match=r"missing\.png: cannot read image \(No such file"):
        open_image(tmp_path / "missing.png")
    with pytest.raises(ImageReadError, match="image bytes: cannot read image"):
        open_image(io.BytesIO(b"x").getvalue())


def test_one_source_for_files_folders_globs_and_shards(tmp_path):
    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    for name in ("b.png", "a.JPG", "sub/c.gif", "sub/d.webp", "sub/e.bmp", ".hidden.jpg"):
        Image.new("RGB", (8, 8), "red").save(photos / name, format="PNG")
    (photos / "notes.txt").write_text("not an image")
    shards = write_damaged_shards(tmp_path / "shards")
    specs = [str(photos), f"{photos}/sub/*.gif", str(shards / "{00000..00001}.tar"), "missing.png",
             str(photos / "notes.txt")]  # fmt: skip
    inputs = expand_inputs(specs)
    assert inputs[:5] == [str(photos / n) for n in ("a.JPG", "b.png", "sub/c.gif", "sub/d.webp", "sub/e.bmp")]
    assert inputs[5:] == [str(photos / "sub/c.gif"), str(shards / "{00000..00001}.tar"), "missing.png",
                          str(photos / "notes.txt")]  # fmt: skip
    sources = list(iter_sources(inputs))
    names = [s.name for s in sources]
    assert names[:6] == inputs[:6]  # hidden files are not data
    assert names[6:12] == [f"{shards / '00000.tar'}#a0", f"{shards / '00000.tar'}#a1"] + [
        f"{shards / '00001.tar'}#b{i}" for i in range(4)
    ]
    errors = {s.name: s.error for s in sources if s.error}
    assert errors == {
        "missing.png": "no such file",
        str(photos / "notes.txt"): f"unsupported file type '.txt' (use {', '.join(IMAGE_SUFFIXES)})",
    }
    assert all(s.open().mode == "RGB" for s in sources[:8])
    with pytest.raises(ImageReadError, match="pixel limit"):
        sources[10].open()  # b2: a bomb member, refused when opened
    assert collect_inputs(specs) == inputs  # describe's inputs are exactly these


def test_describe_curate_and_shards_share_one_suffix_list(tmp_path):
    assert IMAGE_SUFFIXES == (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
    assert IMAGE_EXTENSIONS == tuple(s[1:] for s in IMAGE_SUFFIXES)
    for suffix in IMAGE_SUFFIXES:
        Image.new("RGB", (8, 8)).save(tmp_path / f"x{suffix}", format="PNG")
    (tmp_path / ".x.jpg").write_bytes(b"")
    curated = [image.name for image in iter_images(str(tmp_path))]
    described = expand_inputs([str(tmp_path)])
    assert curated == described and len(curated) == len(IMAGE_SUFFIXES)
