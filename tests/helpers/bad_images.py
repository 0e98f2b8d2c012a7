"""Hostile inputs for the image readers: decompression-bomb PNGs, fake and broken files, damaged shards."""

from __future__ import annotations

import functools
import io
import struct
import tarfile
import zlib
from pathlib import Path

from PIL import Image

# Pillow refuses outright only above 2 × Image.MAX_IMAGE_PIXELS (178,956,970 pixels) and merely warns
# between 1 × and 2 ×; the middle bomb is the one only our own cap catches.
BIG_BOMB = (20_000, 20_000)  # 400 M pixels
MIDDLE_BOMB = (10_000, 10_000)  # 100 M pixels


@functools.cache  # about 1 s for the big one: made once per test session
def bomb_png(width: int, height: int) -> bytes:
    """A complete, valid 1-bit black PNG of ``width`` × ``height``: a few KB that decode to a lot.

    Compressed 100 rows at a time, so making it costs little memory; ``height`` is a multiple of 100.
    """
    rows = b"\x00" * (1 + (width + 7) // 8) * 100  # 100 rows: filter byte "none" + packed bits each
    packer = zlib.compressobj(9)
    data = b"".join(packer.compress(rows) for _ in range(height // 100)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1 bit, grayscale
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png(colour: str = "red", size: tuple[int, int] = (48, 32)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg(colour: str = "blue", size: tuple[int, int] = (48, 32)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="JPEG")
    return buffer.getvalue()


def write_bad_files(folder: Path) -> dict[str, Path]:
    """One file per way an image file can be bad, plus a good one; returns them by name."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "good": ("good.png", png()),
        "bomb": ("bomb.png", bomb_png(*BIG_BOMB)),
        "middle_bomb": ("middle_bomb.png", bomb_png(*MIDDLE_BOMB)),
        "empty": ("empty.jpg", b""),
        "text": ("text.jpg", b"just some words, not a JPEG\n"),
        "truncated": ("truncated.png", png("green", (64, 64))[:60]),
    }
    paths = {}
    for name, (file_name, data) in files.items():
        paths[name] = folder / file_name
        paths[name].write_bytes(data)
    paths["folder"] = folder / "folder.jpg"  # a directory with an image's name
    paths["folder"].mkdir(exist_ok=True)
    return paths


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_damaged_shards(folder: Path) -> Path:
    """Four shards: ``00000`` fine (2 samples), ``00001`` with a garbage and a bomb member among 2 good
    ones, ``00002`` cut off inside its second image, ``00003`` not a tar at all."""
    folder.mkdir(parents=True, exist_ok=True)
    members = {
        0: [("a0", jpeg("red")), ("a1", jpeg("blue"))],
        1: [("b0", jpeg("green")), ("b1", b"garbage bytes"), ("b2", bomb_png(*BIG_BOMB)), ("b3", jpeg())],
        2: [("c0", jpeg("white")), ("c1", jpeg("black"))],
    }
    for index, samples in members.items():
        with tarfile.open(folder / f"{index:05d}.tar", "w") as tar:
            for key, data in samples:
                add_member(tar, f"{key}.jpg", data)
                add_member(tar, f"{key}.txt", b"a caption")
    cut = folder / "00002.tar"
    with tarfile.open(cut) as tar:
        end = tar.getmember("c1.jpg").offset_data + 10  # killed while writing c1's image
    cut.write_bytes(cut.read_bytes()[:end])
    (folder / "00003.tar").write_bytes(b"this is not a tar file\n" * 30)
    return folder
