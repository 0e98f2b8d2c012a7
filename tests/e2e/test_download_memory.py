"""`mgpt4 download`'s memory is bounded by its settings, not by the images it is fed.

Peak RSS is measured by the kernel (``ru_maxrss`` of a finished child process), for the same command on
small images (the baseline: interpreter, libraries, threads) and on large ones.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from helpers.loopback_http import LoopbackServer, big_picture, make_jpeg, png_bomb, png_header_only

MIB = 1 << 20
THREADS = 8
# Runs `mgpt4 download ...` as its only child and prints that child's peak RSS (KiB on Linux).
_PEAK_RSS = (
    "import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(rc)"
)


@pytest.fixture
def server():
    with LoopbackServer() as srv:
        yield srv


def _download_peak_rss(tmp_path: Path, name: str, urls: list[str], *overrides: str) -> tuple[int, Path]:
    url_list = tmp_path / f"{name}.jsonl"
    url_list.write_text("".join(json.dumps({"url": u}) + "\n" for u in urls))
    out = tmp_path / name
    cmd = [sys.executable, "-c", _PEAK_RSS, sys.executable, "-c", "from mgpt4.cli import main; main()",
           "download", str(url_list), "-o", str(out), "--processes", "1", "--threads", str(THREADS),
           "--image-size", "64", "--quiet", "image.max_pixels=8000000", *overrides]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return int(proc.stderr.strip().splitlines()[-1]) * 1024, out


@pytest.mark.slow  # ~8 s alone, 20+ s on a busy 2-core machine (three downloads of 80 MPixel in all)
def test_peak_memory_stays_within_the_decode_budget(tmp_path: Path, server: LoopbackServer) -> None:
    png = big_picture(4000, 2000)  # 8 M pixels, the cap below: 32 MB as a bitmap, ~96 MB by decode_cost
    jpeg = big_picture(3200, 2400, "JPEG")  # bound for 64 px: decoded at 1/8 scale
    big = [server.add_image(f"{i}.png", png) for i in range(THREADS)]
    big += [server.add_image(f"{i}.jpg", jpeg) for i in range(2)]
    bombs = [
        server.add_image("bomb.png", png_bomb(4000, 2500)),  # 10 M pixels of real data: refused unread
        server.add_image("claims.png", png_header_only(60000, 60000)),
    ]
    small = [server.add_image(f"small{i}.jpg", make_jpeg(64, 48, seed=i)) for i in range(len(big))]
    budget = 100 * MIB
    # Bodies in hand (each thread may hold one while it waits for room) and allocator slack.
    slack = THREADS * len(png) + 32 * MIB

    baseline, _ = _download_peak_rss(tmp_path, "small", small)
    bounded, out = _download_peak_rss(tmp_path, "bounded", big + bombs, f"decode_memory_mb={budget // MIB}")
    unbounded, _ = _download_peak_rss(tmp_path, "unbounded", big + bombs, "decode_memory_mb=100000")

    assert bounded - baseline < budget + slack, (bounded - baseline) / MIB
    # Without the budget the same images take more than the bound allows: the budget is what held it.
    assert unbounded - baseline > budget + slack, (unbounded - baseline) / MIB
    records = pq.read_table(out / "00000.parquet").to_pylist()
    assert [r["status"] for r in records].count("success") == len(big)
    refused = [r for r in records if r["status"] != "success"]
    assert [(r["url"], r["error_kind"]) for r in refused] == [(u, "decompression_bomb") for u in bombs]
