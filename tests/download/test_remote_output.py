"""Output (and input) through fsspec: ``memory://`` in this process, ``file://`` through the CLI.

``memory://`` is fsspec's in-process object-store-like filesystem (no folders, whole-object writes), so
these downloads run in this process (``processes=1``); the same code against a real S3 API, across
processes and kills, is in ``tests/e2e/test_download_scaleout.py`` (moto server).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
import uuid
from pathlib import Path

import fsspec
import pytest
from click.testing import CliRunner
from helpers.loopback_http import LoopbackServer, make_jpeg
from helpers.shard_checks import count_folder

from mgpt4.cli import cli
from mgpt4.download import DownloadConfig, FetchConfig, ImageConfig, run_download
from mgpt4.download.remote_shard import RemoteShard
from mgpt4.download.shard_download import shard_key
from mgpt4.download.storage import RemoteFolder
from mgpt4.errors import ConfigError, UsageError


@pytest.fixture
def server():
    with LoopbackServer() as srv:
        yield srv


@pytest.fixture
def memory_url():
    url = f"memory://bucket-{uuid.uuid4().hex[:8]}/laion"
    yield url
    fs = fsspec.filesystem("memory")
    fs.rm(url.removeprefix("memory://").split("/")[0], recursive=True)


def _url_list(path: Path, urls: list[str]) -> Path:
    path.write_text("".join(json.dumps({"url": u, "caption": f"c{i}"}) + "\n" for i, u in enumerate(urls)))
    return path


def _config(url_list: str, output: str, **top: object) -> DownloadConfig:
    cfg = DownloadConfig(
        inputs=[url_list], output=output, shard_size=10, processes=1, threads=3,
        image=ImageConfig(size=32), fetch=FetchConfig(timeout=2.0, retries=0),
    )  # fmt: skip
    return dataclasses.replace(cfg, **top)


def test_memory_output_resumes_after_an_interruption_and_retries_failures(
    tmp_path: Path, server: LoopbackServer, memory_url: str
) -> None:
    good = [server.add_image(f"{i}.jpg", make_jpeg(48, 40, seed=i), delay=0.1) for i in range(24)]
    busy = [server.add(f"/busy/{i}.jpg", body=make_jpeg(48, 40, seed=50 + i), fail_first=10**6,
                       fail_status=503) for i in range(3)]  # fmt: skip
    rows = good[:20] + busy + good[20:]
    url_list = str(_url_list(tmp_path / "urls.jsonl", rows))
    cfg = _config(url_list, memory_url, checkpoint_seconds=0.05)

    def interrupt_after_6(status) -> None:  # Ctrl-C once 6 rows are done
        if status.done >= 6:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_download(cfg, progress=interrupt_after_6)
    fs = fsspec.filesystem("memory")
    names = {p.rsplit("/", 1)[-1] for p in fs.ls(memory_url.removeprefix("memory:/"), detail=False)}
    assert any(n.endswith("_journal.jsonl") for n in names), names  # the stopped shard's state, uploaded
    assert "00002_stats.json" not in names
    assert not any(n.endswith(".tar") and n.replace(".tar", "_stats.json") not in names for n in names)
    hits = dict(server.hits)

    summary = run_download(cfg).to_json()  # resumes from the uploaded partial tar and journal
    refetched = [p for p, n in server.hits.items() if n > hits.get(p, 0) and hits.get(p, 0) > 0]
    # Stored rows are not fetched again; only rows still in flight at Ctrl-C (at most one per thread,
    # fetched but not yet stored) may be.
    assert len([p for p in refetched if not p.startswith("/busy")]) <= cfg.threads
    counts = count_folder(memory_url)
    assert counts.rows == 27 and counts.successes == 24 and counts.leftovers == []
    assert sorted(counts.keys) == sorted(shard_key(i // 10, i % 10, 10) for i in range(27))
    assert summary["dataset"] == {"shards": 3, "rows": 27, "successes": 24}

    for url in busy:
        server.routes[url.removeprefix(server.base)].fail_first = 0
    stored = counts.jpegs
    summary = run_download(dataclasses.replace(cfg, retry_failed=True)).to_json()
    assert summary["run"]["rows"] == 3 and summary["run"]["successes"] == 3
    assert summary["shards"] == {"written": 1, "skipped": 2, "incomplete": 0}
    counts = count_folder(memory_url)
    assert counts.rows == 27 and counts.successes == 27 and counts.leftovers == []
    assert all(counts.jpegs[name] == jpeg for name, jpeg in stored.items())  # kept byte for byte
    extra = [server.hits[u.removeprefix(server.base)] - 1 for u in good]
    assert min(extra) == 0 and sum(extra) <= cfg.threads  # only the rows in flight at Ctrl-C twice
    assert not any(RemoteShard(RemoteFolder(memory_url), i).staging.exists() for i in range(3))  # cleaned up


def test_memory_output_refuses_several_processes(tmp_path: Path) -> None:
    cfg = _config(
        str(_url_list(tmp_path / "u.jsonl", ["http://127.0.0.1:9/x.jpg"])), "memory://b/x", processes=2
    )
    with pytest.raises(ConfigError, match="memory:// folder lives in one process"):
        cfg.validate()


def test_a_live_lease_refuses_a_second_run_and_a_stale_one_does_not(
    tmp_path: Path, server: LoopbackServer, memory_url: str
) -> None:
    cfg = _config(
        str(_url_list(tmp_path / "u.jsonl", [server.add_image("a.jpg", make_jpeg(40, 40))])), memory_url
    )
    fs = fsspec.filesystem("memory")
    lease = memory_url.removeprefix("memory:/") + "/.download.lock"
    fs.pipe_file(lease, json.dumps({"host": "node7", "pid": 42, "renewed": time.time() - 5}).encode())
    with pytest.raises(UsageError, match=r"another `mgpt4 download` .*host node7, pid 42.*delete"):
        run_download(cfg)
    fs.pipe_file(lease, json.dumps({"host": "node7", "pid": 42, "renewed": time.time() - 600}).encode())
    assert run_download(cfg).to_json()["run"]["successes"] == 1
    assert not fs.exists(lease)  # released at the end


def test_file_url_input_and_output_through_the_cli(tmp_path: Path, server: LoopbackServer) -> None:
    urls = [server.add_image(f"{i}.jpg", make_jpeg(60, 40, seed=i)) for i in range(7)]
    url_list = _url_list(tmp_path / "urls.jsonl", [*urls, server.base + "/missing.jpg"])
    out = f"file://{tmp_path}/out"
    args = ["download", f"file://{url_list}", "-o", out, "--shard-size", "3", "--processes", "1", "--json"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["output"] == out and summary["shards"]["written"] == 3
    counts = count_folder(out)
    assert counts.rows == 8 and counts.successes == 7 and counts.leftovers == []
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        *[f"0000{i}{ext}" for i in range(3) for ext in (".parquet", ".tar", "_stats.json")],
        "download_config.yaml",
    ]  # a plain folder, as a local run leaves it (the lease is gone)
    again = CliRunner().invoke(cli, args)
    assert json.loads(again.stdout)["shards"]["skipped"] == 3

    report = CliRunner().invoke(cli, ["download", "report", "-o", out, "--json"])
    assert report.exit_code == 0, report.output
    merged = json.loads(report.stdout)
    assert merged["run"]["rows"] == 8 and merged["run"]["error_kinds"] == {"http_4xx": 1}
    assert merged["run"]["examples"]["http_4xx"].startswith("HTTP 404")
    assert merged["shards"] == {"written": 3, "skipped": 0, "incomplete": 0, "missing": 0}


def test_ray_without_the_extra_is_a_one_line_usage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    url_list = _url_list(tmp_path / "u.jsonl", ["http://127.0.0.1:9/x.jpg"])
    result = CliRunner().invoke(
        cli, ["download", str(url_list), "-o", str(tmp_path / "out"), "--distributor", "ray"]
    )
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        "error: --distributor ray needs Ray, which is not installed: "
        "pip install 'mgpt4[ray]' (in a checkout: pip install -e '.[ray]')"
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--node-rank", "2", "--num-nodes", "2"], "node_rank: must be in 0 … 1"),
        (["--num-nodes", "0"], "num_nodes"),
    ],
)
def test_bad_node_ranks_exit_2(tmp_path: Path, flags: list[str], message: str) -> None:
    url_list = _url_list(tmp_path / "u.jsonl", ["http://127.0.0.1:9/x.jpg"])
    result = CliRunner().invoke(cli, ["download", str(url_list), "-o", str(tmp_path / "out"), *flags])
    assert result.exit_code == 2 and message in result.stderr


def test_report_of_a_folder_without_shards_exits_2(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["download", "report", "-o", str(tmp_path)])
    assert result.exit_code == 2 and "no shards here" in result.stderr


def test_an_unreachable_ray_address_fails_in_one_line_before_writing(tmp_path: Path) -> None:
    pytest.importorskip("ray")
    from helpers.loopback_http import closed_port_url

    address = closed_port_url().removeprefix("http://").split("/")[0]
    url_list = _url_list(tmp_path / "u.jsonl", ["http://127.0.0.1:9/x.jpg"])
    out = tmp_path / "out"
    args = ["download", str(url_list), "-o", str(out), "--distributor", "ray", "--ray-address", address]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1
    assert result.stderr.startswith(f"error: cannot reach the Ray cluster at {address} (")
    assert len(result.stderr.strip().splitlines()) == 1 and not out.exists()
