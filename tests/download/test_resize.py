"""Downloaded bytes → stored JPEG: resize modes, colour modes, EXIF rotation, and every way to refuse."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Callable

import numpy as np
import pytest
from helpers.loopback_http import big_picture, make_jpeg, make_png, png_bomb, png_header_only
from PIL import Image

from mgpt4.download.decode_budget import DecodeBudget
from mgpt4.download.resize import ImageError, process_image


def _decode(jpeg: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(jpeg))
    assert img.format == "JPEG"
    return img.convert("RGB")


@pytest.mark.parametrize(
    ("mode", "src", "out"),
    [
        ("border", (400, 300), (224, 224)),
        ("border", (50, 40), (224, 224)),  # small images are scaled up, as img2dataset does
        ("center_crop", (400, 300), (224, 224)),
        ("center_crop", (300, 700), (224, 224)),
        ("keep_ratio", (400, 300), (299, 224)),
        ("keep_ratio", (300, 600), (224, 448)),
        ("no", (400, 300), (400, 300)),
    ],
)
def test_resize_modes(mode: str, src: tuple[int, int], out: tuple[int, int]) -> None:
    result = process_image(make_jpeg(*src), size=224, mode=mode)
    assert (result.width, result.height) == out
    assert (result.original_width, result.original_height) == src
    assert _decode(result.jpeg).size == out


def test_border_pads_with_white() -> None:
    img = _decode(process_image(make_jpeg(400, 200), size=100, mode="border").jpeg)
    top = np.asarray(img)[:20]  # 400x200 → 100x50 centred: rows 0..24 are padding
    assert top.min() > 240


def test_reduced_decoding_matches_a_full_decode() -> None:
    """The DCT-domain shortcut must not cost visible quality against decode-whole-then-resize."""
    data = make_jpeg(1000, 800, seed=3, quality=95)
    fast = np.asarray(_decode(process_image(data, size=224, mode="keep_ratio").jpeg), dtype=np.float32)
    reference = Image.open(io.BytesIO(data)).convert("RGB").resize((280, 224), Image.Resampling.LANCZOS)
    diff = np.abs(fast - np.asarray(reference, dtype=np.float32))
    assert fast.shape == diff.shape and diff.mean() < 3.0


def test_transparency_is_flattened_on_white() -> None:
    img = _decode(process_image(make_png(200, 200, alpha=True), size=100, mode="border").jpeg)
    left = np.asarray(img)[:, :40]  # the transparent half
    assert left.mean() > 245


@pytest.mark.parametrize("mode", ["L", "CMYK", "P", "I;16"])
def test_colour_modes_become_rgb(mode: str) -> None:
    src = Image.open(io.BytesIO(make_jpeg(120, 90))).convert(mode if mode != "I;16" else "I")
    if mode == "I;16":
        src = src.convert("I;16")
    buf = io.BytesIO()
    src.save(buf, "JPEG" if mode in ("L", "CMYK") else "PNG")
    result = process_image(buf.getvalue(), size=64, mode="border")
    assert _decode(result.jpeg).mode == "RGB" and result.width == 64


def test_exif_rotation_is_applied() -> None:
    stored = np.zeros((200, 400, 3), np.uint8)
    stored[:, :200] = (255, 0, 0)  # left half red, right half blue as stored
    stored[:, 200:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display": a phone photo taken upright
    buf = io.BytesIO()
    Image.fromarray(stored).save(buf, "JPEG", exif=exif.tobytes(), quality=95)
    result = process_image(buf.getvalue(), size=100, mode="keep_ratio")
    assert (result.original_width, result.original_height) == (200, 400)
    shown = np.asarray(_decode(result.jpeg), dtype=np.float32)
    assert shown.shape == (200, 100, 3)
    top, bottom = shown[:90].mean(axis=(0, 1)), shown[110:].mean(axis=(0, 1))
    assert top[0] > 200 > top[2] and bottom[2] > 200 > bottom[0]  # stored left is displayed on top


def test_refusals_have_reasons() -> None:
    cases = {
        "not_image": lambda: process_image(b"<html><body>404</body></html>"),
        "truncated": lambda: process_image(make_jpeg(400, 300, seed=1)[:4000]),
        "decompression_bomb": lambda: process_image(png_header_only(60000, 60000)),
        "too_small": lambda: process_image(make_jpeg(30, 20), min_size=32),
    }
    for kind, call in cases.items():
        with pytest.raises(ImageError) as info:
            call()
        assert info.value.kind == kind, (kind, str(info.value))
    with pytest.raises(ImageError, match="1000x1000 = 1000000 pixels > 250000") as info:
        process_image(make_png(1000, 1000), max_pixels=250_000)
    assert info.value.kind == "decompression_bomb"
    with pytest.raises(ImageError) as info:
        process_image(b"")
    assert info.value.kind == "not_image"


def test_a_real_bomb_is_refused_before_decoding() -> None:
    bomb = png_bomb(3000, 3000)  # 9 M pixels of real, decodable data in ~60 KB
    budget = DecodeBudget(1 << 30)
    with pytest.raises(ImageError, match="3000x3000 = 9000000 pixels > 8000000") as info:
        process_image(bomb, max_pixels=8_000_000, budget=budget)
    assert info.value.kind == "decompression_bomb" and budget.peak == 0  # nothing was reserved or decoded
    assert process_image(bomb, size=32, budget=budget).width == 32  # under the cap it is just an image


def test_large_jpegs_decode_at_reduced_scale_and_reserve_accordingly() -> None:
    """The reservation is the decode cost from the header: a JPEG bound for 224 px is decoded at 1/8."""
    reserved = {}
    for fmt in ("JPEG", "PNG"):
        budget = DecodeBudget(1 << 30)
        result = process_image(big_picture(2400, 1600, fmt), size=224, budget=budget)
        assert (result.width, result.original_width) == (224, 2400)
        reserved[fmt] = budget.peak
    # 12 bytes per decoded pixel plus the output: 300x200 for the JPEG, 2400x1600 for the PNG
    assert reserved["JPEG"] == (300 * 200 + 224 * 149 + 224 * 224) * 12
    assert reserved["PNG"] == (2400 * 1600 + 224 * 149 + 224 * 224) * 12


def test_decode_budget_bounds_what_threads_hold_at_once() -> None:
    budget = DecodeBudget(100)
    holding, most, order = [0], [0], []
    lock, release = threading.Lock(), threading.Event()

    def work(name: str, nbytes: int) -> None:
        with budget.reserve(nbytes):
            with lock:
                holding[0] += nbytes
                most[0] = max(most[0], holding[0])
                order.append(name)
            release.wait()
            with lock:
                holding[0] -= nbytes

    def start(name: str, nbytes: int, until: Callable[[], bool]) -> threading.Thread:
        thread = threading.Thread(target=work, args=(name, nbytes))
        thread.start()
        deadline = time.monotonic() + 10
        while not until() and time.monotonic() < deadline:
            time.sleep(0.001)
        return thread

    threads = [start(f"small{i}", 30, lambda i=i: budget.in_use == 30 * (i + 1)) for i in range(3)]
    threads.append(start("huge", 250, lambda: budget.waiting == 1))  # more than the whole budget
    threads += [start(f"late{i}", 30, lambda i=i: budget.waiting == i + 2) for i in range(3)]
    assert budget.in_use == 90 and budget.waiting == 4  # 30 more would not fit: everyone after waits
    release.set()
    for t in threads:
        t.join()
    assert most[0] == 250  # the huge one ran alone; the small ones never held more than 90 together
    assert budget.peak == 100 and budget.in_use == 0
    assert order[3] == "huge"  # first come, first served: the later small ones did not overtake it
