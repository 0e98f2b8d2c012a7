"""`open_image`: the one decoder behind describe, chat, curate and training, with one pixel cap."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from mgpt4.data.images import MAX_IMAGE_PIXELS, ImageReadError, open_image
from tests.helpers.bad_images import BIG_BOMB, MIDDLE_BOMB, bomb_png, png, write_bad_files

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
