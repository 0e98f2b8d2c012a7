"""`mgpt4 download` SIGKILLed at awkward moments, with the URLs it already stored gone dead afterwards.

Every scenario ends by counting: each input row exactly once in the tar, the parquet and the stats, no
stored image lost, no key twice, nothing already stored fetched again, no leftover partial files.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from helpers.loopback_http import LoopbackServer, make_jpeg

from mgpt4.cli import cli

KILL_AT = Path(__file__).resolve().parents[1] / "helpers" / "kill_at.py"
GOOD, BUSY = 30, 10  # rows stored by the first run / rows that failed transiently (HTTP 503) in it


@pytest.fixture
def server():
    with LoopbackServer() as srv:
        yield srv


def _download(out: Path, urls: Path, *extra: str, kill: str | None = None) -> tuple[int, str]:
    """Exit code and stderr of `mgpt4 download`: in this process, or in a subprocess killed at ``kill``."""
    args = [str(urls), "-o", str(out), "--processes", "1", "--threads", "3", "--image-size", "32",
            "fetch.retries=0", "--quiet", *extra]  # fmt: skip
    if kill is None:
        result = CliRunner().invoke(cli, ["download", *args])
        return result.exit_code, result.stderr
    cmd = [sys.executable, str(KILL_AT), kill, "--", "download", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    return proc.returncode, proc.stderr


def _setup(tmp_path: Path, server: LoopbackServer) -> tuple[Path, Path, list[str], dict[str, bytes]]:
    """One shard: GOOD images stored, BUSY rows failed with 503; then the stored URLs all go dead."""
    good = [server.add_image(f"{i}.jpg", make_jpeg(48, 40, seed=i)) for i in range(GOOD)]
    busy = [server.add(f"/busy/{i}.jpg", body=make_jpeg(48, 40, seed=100 + i), fail_first=10**6,
                       fail_status=503) for i in range(BUSY)]  # fmt: skip
    rows = [u for pair in zip(good[:BUSY], busy, strict=True) for u in pair] + good[BUSY:]  # interleaved
    urls = tmp_path / "urls.jsonl"
    urls.write_text("".join(json.dumps({"url": u, "caption": f"c{i}"}) + "\n" for i, u in enumerate(rows)))
    out = tmp_path / "out"
    code, err = _download(out, urls)
    assert code == 0, err
    assert _count(out)["successes"] == GOOD
    stored = _jpegs(out)
    for url in good:  # the images are stored: their URLs die
        server.routes[url.removeprefix(server.base)].status = 404
    for url in busy:  # the busy server recovers
        server.routes[url.removeprefix(server.base)].fail_first = 0
    return out, urls, good, stored


def _jpegs(out: Path) -> dict[str, bytes]:
    with tarfile.open(out / "00000.tar") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".jpg")}


def _count(out: Path) -> dict[str, int]:
    """Counts across tar, parquet and stats, asserting each holds every row exactly once."""
    with tarfile.open(out / "00000.tar") as tar:
        names = [m.name for m in tar.getmembers()]
    dupes = [n for n, c in Counter(names).items() if c > 1]
    assert not dupes, f"keys twice in the tar: {dupes[:5]}"
    tar_keys = {n.partition(".")[0] for n in names}
    assert all({f"{k}.jpg", f"{k}.txt", f"{k}.json"} <= set(names) for k in tar_keys)
    records = pq.read_table(out / "00000.parquet").to_pylist()
    keys = [r["key"] for r in records]
    assert len(keys) == len(set(keys)) == GOOD + BUSY
    assert {r["key"] for r in records if r["status"] == "success"} == tar_keys
    stats = json.loads((out / "00000_stats.json").read_text())
    assert stats["count"] == GOOD + BUSY and stats["successes"] == len(tar_keys)
    return {"successes": len(tar_keys)}


def _assert_nothing_lost(
    out: Path, server: LoopbackServer, good: list[str], stored: dict[str, bytes]
) -> None:
    assert _count(out)["successes"] == GOOD + BUSY  # every stored image kept, every busy row retried
    final = _jpegs(out)
    assert all(final[name] == jpeg for name, jpeg in stored.items())  # the very bytes stored at first
    assert all(server.hits[u.removeprefix(server.base)] == 1 for u in good), "a stored image was refetched"
    assert not [p.name for p in out.iterdir() if p.name.endswith((".partial", ".salvage", ".jsonl", ".tmp"))]


# tar members: 3 per sample; the retry first copies the GOOD stored samples, then writes the BUSY fetched ones
COPIED = 3 * GOOD
SLOW = pytest.mark.slow  # this file takes ~25 s on a quiet 2-core machine; these add the rarer moments
KILL_POINTS = [
    pytest.param(f"addfile:{3 * 10 + 1}", id="while copying the stored samples"),
    pytest.param(f"addfile:{COPIED + 1}", id="after the copy, before the first fetched sample", marks=SLOW),
    pytest.param(f"torn:{COPIED + 3 * 2 + 1}", id="mid-write of a fetched sample (torn tar)"),
    pytest.param(f"addfile:{COPIED + 3 * 5 + 1}", id="mid-retry, 5 samples fetched", marks=SLOW),
    pytest.param("after-replace:00000.tar.partial", id="between the tar rename and the stats"),
    pytest.param("after-replace:00000.parquet.tmp", id="after the parquet rename", marks=SLOW),
    pytest.param("after-replace:00000_stats.json.tmp", id="right after the stats", marks=SLOW),
]


@pytest.mark.parametrize("point", KILL_POINTS)
def test_retry_failed_killed_then_rerun_loses_nothing(
    tmp_path: Path, server: LoopbackServer, point: str
) -> None:
    out, urls, good, stored = _setup(tmp_path, server)
    code, err = _download(out, urls, "--retry-failed", kill=point)
    assert code == -signal.SIGKILL, err
    # A plain rerun (leaves a complete shard alone, or completes it), then the retry again.
    for extra in ((), ("--retry-failed",)):
        code, err = _download(out, urls, *extra)
        assert code == 0, err
    _assert_nothing_lost(out, server, good, stored)


@pytest.mark.parametrize(
    "point",
    [
        "after-replace:00000.tar.partial",
        pytest.param("after-replace:00000.parquet.tmp", marks=SLOW),
        pytest.param("after-replace:00000_stats.json.tmp", marks=SLOW),
    ],
)
def test_first_run_killed_while_completing_needs_no_fetch(
    tmp_path: Path, server: LoopbackServer, point: str
) -> None:
    """Killed inside the completion (tar renamed, parquet or stats not yet): every row is on disk already."""
    urls = [server.add_image(f"{i}.jpg", make_jpeg(48, 40, seed=i)) for i in range(GOOD + BUSY)]
    url_list = tmp_path / "urls.jsonl"
    url_list.write_text(
        "".join(json.dumps({"url": u, "caption": f"c{i}"}) + "\n" for i, u in enumerate(urls))
    )
    out = tmp_path / "out"
    assert _download(out, url_list, kill=point)[0] == -signal.SIGKILL
    for url in urls:
        server.routes[url.removeprefix(server.base)].status = 404
    code, err = _download(out, url_list)
    assert code == 0, err
    assert _count(out)["successes"] == GOOD + BUSY
    assert all(n == 1 for n in server.hits.values())


@SLOW
def test_retry_killed_twice_in_a_row(tmp_path: Path, server: LoopbackServer) -> None:
    out, urls, good, stored = _setup(tmp_path, server)
    for point in ("addfile:61", "addfile:31", f"torn:{COPIED + 4}"):  # each rerun killed earlier in its copy
        assert _download(out, urls, "--retry-failed", kill=point)[0] == -signal.SIGKILL
    code, err = _download(out, urls, "--retry-failed")
    assert code == 0, err
    _assert_nothing_lost(out, server, good, stored)


@SLOW
def test_retry_killed_soon_after_the_partial_appears(tmp_path: Path, server: LoopbackServer) -> None:
    """The report's sequence: SIGKILL ~20 ms after ``00000.tar.partial`` appears, whatever it was doing."""
    out, urls, good, stored = _setup(tmp_path, server)
    for delay in (0.0, 0.02, 0.05):
        args = [str(urls), "-o", str(out), "--processes", "1", "--threads", "3", "--image-size", "32",
                "fetch.retries=0", "--quiet", "--retry-failed"]  # fmt: skip
        cmd = [sys.executable, "-c", "from mgpt4.cli import main; main()", "download", *args]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while (
            not (out / "00000.tar.partial").exists() and proc.poll() is None and time.monotonic() < deadline
        ):
            time.sleep(0.001)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    code, err = _download(out, urls, "--retry-failed")
    assert code == 0, err
    _assert_nothing_lost(out, server, good, stored)
