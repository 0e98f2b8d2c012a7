"""``run_download`` against a real HTTP server on 127.0.0.1: shards, every failure kind, resume, retries."""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import io
import json
import shutil
import tarfile
import threading
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from helpers.loopback_http import (
    LoopbackServer,
    closed_port_url,
    make_jpeg,
    make_png,
    png_header_only,
    self_signed_cert,
)
from PIL import Image

from mgpt4.data.sources import UrlRow
from mgpt4.download import DownloadConfig, FetchConfig, ImageConfig, run_download
from mgpt4.download.fetch import Fetcher, FetchError
from mgpt4.download.shard_download import ShardJob, download_shard, shard_key
from mgpt4.errors import UsageError

SAMPLE_JSON_KEYS = {
    "key",
    "url",
    "caption",
    "status",
    "width",
    "height",
    "original_width",
    "original_height",
    "sha256",
    "error_message",
}


@pytest.fixture
def server():
    with LoopbackServer() as srv:
        yield srv


def _url_list(folder: Path, urls: list[str | None], name: str = "urls.jsonl") -> Path:
    path = folder / name
    path.write_text(
        "".join(json.dumps({"url": u, "caption": f"caption {i}"}) + "\n" for i, u in enumerate(urls))
    )
    return path


def _config(tmp_path: Path, url_list: Path, **top: Any) -> DownloadConfig:
    fetch = FetchConfig(timeout=1.0, backoff_base=0.02, retries=2, max_bytes=400_000)
    cfg = DownloadConfig(
        inputs=[str(url_list)],
        output=str(tmp_path / "out"),
        shard_size=100,
        processes=1,
        threads=8,
        image=ImageConfig(size=64),
        fetch=fetch,
    )
    return dataclasses.replace(cfg, **top)


def _records(out: Path, shard: int = 0) -> list[dict[str, Any]]:
    return pq.read_table(out / f"{shard:05d}.parquet").to_pylist()


def _samples(tar_path: Path) -> dict[str, dict[str, bytes]]:
    """Every member of a tar, read to the end (a torn tar raises)."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(tar_path) as tar:
        for member in tar.getmembers():
            key, _, ext = member.name.partition(".")
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def test_shard_is_img2dataset_compatible(tmp_path: Path, server: LoopbackServer) -> None:
    bodies = [
        make_jpeg(320, 240, seed=1),
        make_jpeg(200, 500, seed=2),
        make_png(120, 120, seed=3, alpha=True),
    ]
    urls = [server.add_image(f"{i}.img", body) for i, body in enumerate(bodies)]
    summary = run_download(_config(tmp_path, _url_list(tmp_path, urls))).to_json()
    out = tmp_path / "out"

    names = sorted(p.name for p in out.iterdir())
    assert names == [
        ".download.lock",
        "00000.parquet",
        "00000.tar",
        "00000_stats.json",
        "download_config.yaml",
    ]
    samples = _samples(out / "00000.tar")
    assert sorted(samples) == ["0000000", "0000001", "0000002"]  # 5 shard digits + 2 row digits (100 rows)
    for i, key in enumerate(sorted(samples)):
        files = samples[key]
        assert set(files) == {"jpg", "txt", "json"}
        meta = json.loads(files["json"])
        assert set(meta) == SAMPLE_JSON_KEYS
        assert (
            meta["caption"] == files["txt"].decode() == f"caption {i}"
        )  # the official loader reads json caption
        assert meta["status"] == "success" and meta["url"] == urls[i] and meta["error_message"] is None
        assert meta["sha256"] == hashlib.sha256(bodies[i]).hexdigest()
        img = Image.open(io.BytesIO(files["jpg"]))
        assert img.format == "JPEG" and img.size == (64, 64) == (meta["width"], meta["height"])
    assert [(r["original_width"], r["original_height"]) for r in _records(out)] == [
        (320, 240),
        (200, 500),
        (120, 120),
    ]
    stats = json.loads((out / "00000_stats.json").read_text())
    assert stats["count"] == stats["successes"] == 3 and stats["failed_to_download"] == 0
    assert summary["run"]["successes"] == 3 and summary["shards"] == {
        "written": 1,
        "skipped": 0,
        "incomplete": 0,
    }


def test_webdataset_reads_the_shards_like_the_official_loader(tmp_path: Path, server: LoopbackServer) -> None:
    wds = pytest.importorskip("webdataset")
    urls = [server.add_image(f"{i}.jpg", make_jpeg(100 + i, 80, seed=i)) for i in range(5)]
    run_download(_config(tmp_path, _url_list(tmp_path, urls), shard_size=3))
    shards = sorted(str(p) for p in (tmp_path / "out").glob("*.tar"))
    # MiniGPT-4's cc_sbu/laion datasets: decode("pilrgb"), to_tuple("jpg", "json"), caption = json["caption"]
    dataset = wds.WebDataset(shards, shardshuffle=False).decode("pilrgb").to_tuple("jpg", "json")
    pairs = list(dataset)
    assert len(pairs) == 5
    assert all(img.mode == "RGB" and img.size == (64, 64) for img, _ in pairs)
    assert sorted(meta["caption"] for _, meta in pairs) == [f"caption {i}" for i in range(5)]


def test_every_failure_kind_is_recorded_and_never_fatal(tmp_path: Path, server: LoopbackServer) -> None:
    jpeg = make_jpeg(160, 120, seed=7)
    cases: list[tuple[str | None, str, str | None]] = [
        (server.add_image("ok.jpg", jpeg), "success", None),
        (server.add("/r/1", status=302, headers={"Location": "/r/2"}), "success", None),
        (server.add("/missing.jpg", status=404, body=b"gone"), "failed_to_download", "http_4xx"),
        (server.add("/error.jpg", status=500, body=b"oops"), "failed_to_download", "http_5xx"),
        (None, "failed_to_download", "bad_url"),
        ("ftp://127.0.0.1/x.jpg", "failed_to_download", "bad_url"),
        ("http://", "failed_to_download", "bad_url"),
        (server.add("/slow.jpg", delay=3.0, body=jpeg), "failed_to_download", "timeout"),
        (server.add("/drip.jpg", drip=0.05, body=jpeg), "failed_to_download", "timeout"),
        (
            server.add("/loop", status=302, headers={"Location": "/loop"}),
            "failed_to_download",
            "too_many_redirects",
        ),
        (
            server.add("/to-ftp", status=301, headers={"Location": "ftp://x/y"}),
            "failed_to_download",
            "bad_url",
        ),
        (server.add("/refused"[:0] or "/r/none", status=302), "failed_to_download", "protocol"),
        (closed_port_url(), "failed_to_download", "connection"),
        (server.add("/reset.jpg", reset=True), "failed_to_download", "connection"),
        (server.add("/short.jpg", body=jpeg, close_after=500), "failed_to_download", "connection"),
        (server.add("/big.jpg", body=b"\xff" * 500_000), "failed_to_download", "too_large"),
        (server.add("/endless.jpg", chunked_forever=True), "failed_to_download", "too_large"),
        (
            server.add("/noai.jpg", body=jpeg, headers={"X-Robots-Tag": "noai"}),
            "failed_to_download",
            "disallowed",
        ),
        (
            server.add("/page.html", body=b"<html>hello</html>", content_type="text/html"),
            "failed_to_resize",
            "not_image",
        ),
        (server.add("/torn.jpg", body=make_jpeg(400, 300, seed=8)[:3000]), "failed_to_resize", "truncated"),
        (
            server.add("/bomb.png", body=png_header_only(60000, 60000)),
            "failed_to_resize",
            "decompression_bomb",
        ),
        (server.add("/big-pixels.png", body=make_png(700, 700)), "failed_to_resize", "decompression_bomb"),
        (server.add("/tiny.jpg", body=make_jpeg(8, 8)), "failed_to_resize", "too_small"),
    ]
    server.add("/r/2", status=307, headers={"Location": "/img/ok.jpg"})
    cfg = _config(tmp_path, _url_list(tmp_path, [c[0] for c in cases]), threads=12)
    cfg = dataclasses.replace(
        cfg,
        image=ImageConfig(size=64, min_size=16, max_pixels=400_000),
        fetch=dataclasses.replace(cfg.fetch, timeout=0.5),
    )
    started = time.monotonic()
    summary = run_download(cfg).to_json()
    assert time.monotonic() - started < 10  # slow and endless bodies are cut by the deadline and the cap

    got = [(r["status"], r["error_kind"]) for r in _records(tmp_path / "out")]
    assert got == [(status, kind) for _, status, kind in cases]
    assert all(r["error_message"] for r in _records(tmp_path / "out") if r["status"] != "success")
    assert sorted(_samples(tmp_path / "out" / "00000.tar")) == ["0000000", "0000001"]
    assert summary["run"]["successes"] == 2 and summary["run"]["rows"] == len(cases)
    assert server.hits["/loop"] == 6  # the first request and 5 redirects (fetch.max_redirects)


def test_429_and_503_back_off_then_retry(tmp_path: Path, server: LoopbackServer) -> None:
    jpeg = make_jpeg(64, 64)
    urls = [
        server.add("/limited.jpg", body=jpeg, fail_first=2, fail_status=429),  # Retry-After: 0.05
        server.add("/busy.jpg", body=jpeg, fail_first=1000, fail_status=503),
    ]
    started = time.monotonic()
    run_download(_config(tmp_path, _url_list(tmp_path, urls)))
    records = _records(tmp_path / "out")
    assert records[0]["status"] == "success" and server.hits["/limited.jpg"] == 3
    assert records[1]["error_kind"] == "http_5xx" and server.hits["/busy.jpg"] == 3  # 1 + fetch.retries
    assert time.monotonic() - started >= 0.1  # two Retry-After pauses were honoured


def test_per_host_concurrency_limit(tmp_path: Path, server: LoopbackServer) -> None:
    jpeg = make_jpeg(64, 64)
    urls = [server.add_image(f"{i}.jpg", jpeg, delay=0.1) for i in range(12)]
    url_list = _url_list(tmp_path, urls)
    cfg = _config(tmp_path, url_list, threads=6)
    run_download(dataclasses.replace(cfg, fetch=dataclasses.replace(cfg.fetch, max_per_host=2)))
    assert server.max_in_flight == 2
    server.max_in_flight = 0
    run_download(dataclasses.replace(cfg, output=str(tmp_path / "out2")))
    assert server.max_in_flight > 2  # the measurement can see more when allowed


def test_keep_alive_reuses_connections(server: LoopbackServer) -> None:
    fetcher = Fetcher(FetchConfig(timeout=2.0))
    jpeg = make_jpeg(64, 64)
    urls = [server.add_image(f"{i}.jpg", jpeg) for i in range(10)]
    assert all(fetcher.fetch(u) == jpeg for u in urls)
    assert len(server.connections) == 1  # one TCP connection for ten images from one host and thread
    fetcher.close()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl tool to make a certificate")
def test_https_verifies_certificates(tmp_path: Path) -> None:
    cert, key = self_signed_cert(tmp_path)
    jpeg = make_jpeg(64, 64)
    with LoopbackServer(tls=(cert, key)) as server:
        url = server.add_image("a.jpg", jpeg)
        assert url.startswith("https://127.0.0.1:")
        fetcher = Fetcher(FetchConfig(timeout=2.0))
        with pytest.raises(FetchError) as info:
            fetcher.fetch(url)  # a self-signed certificate is not trusted
        assert info.value.kind == "ssl" and not info.value.transient
        fetcher._ssl.load_verify_locations(cert)  # now trust it, as a private CA would be trusted
        assert fetcher.fetch(url) == jpeg and fetcher.fetch(url) == jpeg
        assert len(server.connections) == 1  # both requests went over one kept-alive TLS connection


def test_rerun_skips_complete_shards(tmp_path: Path, server: LoopbackServer) -> None:
    urls = [server.add_image(f"{i}.jpg", make_jpeg(64, 48, seed=i)) for i in range(10)]
    cfg = _config(tmp_path, _url_list(tmp_path, urls), shard_size=4)
    first = run_download(cfg).to_json()
    assert first["shards"]["written"] == 3 and sum(server.hits.values()) == 10
    second = run_download(cfg).to_json()
    assert second["shards"] == {"written": 0, "skipped": 3, "incomplete": 0}
    assert sum(server.hits.values()) == 10 and second["run"]["rows"] == 0
    assert second["dataset"] == {"shards": 3, "rows": 10, "successes": 10}


def test_a_grown_list_fetches_only_the_new_rows(tmp_path: Path, server: LoopbackServer) -> None:
    urls = [server.add_image(f"{i}.jpg", make_jpeg(64, 48, seed=i)) for i in range(9)]
    cfg = _config(tmp_path, _url_list(tmp_path, urls[:6]), shard_size=4)
    run_download(cfg)  # shards 0 (4 rows) and 1 (2 rows)
    _url_list(tmp_path, urls)  # three rows appended: shard 1 grows to 4, shard 2 appears
    summary = run_download(cfg).to_json()
    assert summary["shards"] == {"written": 2, "skipped": 1, "incomplete": 0}
    assert summary["run"]["rows"] == 3 and all(n == 1 for n in server.hits.values())
    assert len(_samples(tmp_path / "out" / "00001.tar")) == 4
    assert summary["dataset"] == {"shards": 3, "rows": 9, "successes": 9}


@pytest.mark.parametrize("torn", [False, True])
def test_interrupted_shard_resumes_without_refetching(
    tmp_path: Path, server: LoopbackServer, torn: bool
) -> None:
    urls = [server.add_image(f"{i}.jpg", make_jpeg(80, 60, seed=i), delay=0.01) for i in range(24)]
    url_list = _url_list(tmp_path, urls)
    out = tmp_path / "out"
    stop = threading.Event()
    finished = []

    def report(ok: bool) -> None:  # "Ctrl-C" after 8 rows
        finished.append(ok)
        if len(finished) >= 8:
            stop.set()

    job = ShardJob(0, [UrlRow(u, f"caption {i}") for i, u in enumerate(urls)], shard_size=100)
    cfg = _config(tmp_path, url_list)
    result = download_shard(job, out, Fetcher(cfg.fetch), cfg.image, 3, stop, report)
    assert not result.completed
    assert not (out / "00000_stats.json").exists() and not (out / "00000.tar").exists()
    journal = [json.loads(line) for line in (out / "00000_journal.jsonl").read_text().splitlines()]
    assert len(journal) >= 8
    if torn:  # the process died mid-write: cut the partial tar inside its last member
        partial = out / "00000.tar.partial"
        partial.write_bytes(partial.read_bytes()[:-700])
    hits_before = dict(server.hits)

    summary = run_download(cfg).to_json()
    assert summary["shards"]["written"] == 1 and summary["dataset"]["successes"] == 24
    samples = _samples(out / "00000.tar")
    assert sorted(samples) == [shard_key(0, i, 100) for i in range(24)]
    # Rows the journal recorded are not fetched again, except the one whose sample the tear destroyed.
    # (Rows that were still in flight when the stop came are fetched again, as they must be.)
    journaled = {r["url"].removeprefix(server.base) for r in journal}
    refetched = [p for p, n in server.hits.items() if n > hits_before.get(p, 0) and p in journaled]
    assert len(refetched) == (1 if torn else 0)
    assert (
        not list(out.glob("*.partial"))
        and not list(out.glob("*journal*"))
        and not list(out.glob("*.salvage"))
    )


def test_retry_failed_refetches_only_transient_failures(tmp_path: Path, server: LoopbackServer) -> None:
    jpeg = make_jpeg(64, 64)
    good = [server.add_image(f"{i}.jpg", jpeg) for i in range(8)]
    busy = server.add("/busy.jpg", body=jpeg, fail_first=10**6, fail_status=503)
    slow = server.add("/slow.jpg", body=jpeg, delay=1.0)
    gone = server.add("/gone.jpg", status=404)
    # shard 0: 3 ok + 503 | shard 1: timeout + 404 + 2 ok | shard 2: 4 ok (nothing to retry)
    urls = good[:3] + [busy, slow, gone] + good[3:]
    cfg = _config(tmp_path, _url_list(tmp_path, urls), shard_size=4)
    cfg = dataclasses.replace(cfg, fetch=dataclasses.replace(cfg.fetch, retries=0, timeout=0.3))
    assert run_download(cfg).to_json()["run"]["successes"] == 8
    server.routes["/busy.jpg"].fail_first = 0  # the server recovered
    server.routes["/slow.jpg"].delay = 0.0
    hits = dict(server.hits)

    assert run_download(cfg).to_json()["run"]["rows"] == 0  # a plain rerun leaves complete shards alone
    summary = run_download(dataclasses.replace(cfg, retry_failed=True)).to_json()
    assert summary["run"] == {**summary["run"], "rows": 2, "successes": 2}
    assert summary["shards"] == {"written": 2, "skipped": 1, "incomplete": 0}
    assert {p: n - hits.get(p, 0) for p, n in server.hits.items() if n != hits.get(p, 0)} == {
        "/busy.jpg": 1,
        "/slow.jpg": 1,
    }
    out = tmp_path / "out"
    assert len(_samples(out / "00000.tar")) == 4 and len(_samples(out / "00001.tar")) == 3
    assert [r["status"] for r in _records(out, 1)] == ["success", "failed_to_download", "success", "success"]
    assert json.loads((out / "00001_stats.json").read_text())["successes"] == 3
    assert summary["dataset"] == {"shards": 3, "rows": 11, "successes": 10}


def test_two_processes_write_the_same_shards(tmp_path: Path, server: LoopbackServer) -> None:
    urls = [server.add_image(f"{i}.jpg", make_jpeg(90, 70, seed=i)) for i in range(20)]
    url_list = _url_list(tmp_path, urls)
    summary = run_download(_config(tmp_path, url_list, shard_size=5, processes=2, threads=4)).to_json()
    assert summary["shards"]["written"] == 4 and summary["run"]["successes"] == 20
    run_download(_config(tmp_path, url_list, shard_size=5, output=str(tmp_path / "single")))
    for shard in range(4):
        a = _samples(tmp_path / "out" / f"{shard:05d}.tar")
        b = _samples(tmp_path / "single" / f"{shard:05d}.tar")
        assert sorted(a) == sorted(b) and all(a[k]["jpg"] == b[k]["jpg"] for k in a)


def test_changed_settings_and_busy_folders_are_refused(tmp_path: Path, server: LoopbackServer) -> None:
    url_list = _url_list(tmp_path, [server.add_image("a.jpg", make_jpeg(64, 64))])
    cfg = _config(tmp_path, url_list, shard_size=4)
    run_download(cfg)
    with pytest.raises(UsageError, match="shard_size=4.*shard_size=5"):
        run_download(dataclasses.replace(cfg, shard_size=5))
    with pytest.raises(UsageError, match="image="):
        run_download(dataclasses.replace(cfg, image=ImageConfig(size=128)))
    run_download(dataclasses.replace(cfg, threads=3, processes=1, decode_memory_mb=64))  # may change
    with open(tmp_path / "out" / ".download.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(UsageError, match="another `mgpt4 download`"):
            run_download(cfg)
    (tmp_path / "file").write_text("")
    with pytest.raises(UsageError, match="cannot create the output folder"):
        run_download(dataclasses.replace(cfg, output=str(tmp_path / "file" / "out")))
    with pytest.raises(UsageError, match="is a file"):
        run_download(dataclasses.replace(cfg, output=str(tmp_path / "file")))


def test_shard_keys_follow_img2dataset() -> None:
    assert shard_key(3, 7, 10000) == "000030007"
    assert shard_key(12, 999, 1000) == "00012999"
    assert shard_key(0, 0, 1) == "00000"
