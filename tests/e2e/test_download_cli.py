"""`mgpt4 download` as a user runs it: flags, JSON/quiet output, exit codes, kill -9 / Ctrl-C and resume."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from click.testing import CliRunner
from helpers.loopback_http import LoopbackServer, make_jpeg
from PIL import Image

from mgpt4.cli import cli

MGPT4 = [sys.executable, "-c", "from mgpt4.cli import main; main()"]


@pytest.fixture
def server():
    with LoopbackServer() as srv:
        yield srv


def _jsonl(path: Path, urls: list[str]) -> Path:
    path.write_text("".join(json.dumps({"url": u, "caption": f"c{i}"}) + "\n" for i, u in enumerate(urls)))
    return path


def _images(server: LoopbackServer, n: int, **route: object) -> list[str]:
    return [server.add_image(f"{i}.jpg", make_jpeg(120, 90, seed=i), **route) for i in range(n)]


def _run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, ["download", *args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def _sample_sizes(out: Path) -> set[tuple[int, int]]:
    import tarfile

    sizes = set()
    for tar_path in out.glob("*.tar"):
        with tarfile.open(tar_path) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".jpg"):
                    sizes.add(Image.open(tar.extractfile(m)).size)
    return sizes


def test_json_summary_and_shards(tmp_path: Path, server: LoopbackServer) -> None:
    urls = _jsonl(tmp_path / "urls.jsonl", _images(server, 4) + [server.base + "/nope.jpg"])
    code, out, _ = _run(
        str(urls),
        "-o",
        str(tmp_path / "out"),
        "--shard-size",
        "2",
        "--processes",
        "1",
        "--threads",
        "4",
        "--image-size",
        "48",
        "--json",
    )
    assert code == 0
    summary = json.loads(out)
    assert summary["run"]["successes"] == 4 and summary["run"]["error_kinds"] == {"http_4xx": 1}
    assert summary["shards"]["written"] == 3
    assert sorted(p.name for p in (tmp_path / "out").glob("*_stats.json")) == [
        "00000_stats.json",
        "00001_stats.json",
        "00002_stats.json",
    ]
    assert _sample_sizes(tmp_path / "out") == {(48, 48)}


def test_human_summary_table_and_quiet(tmp_path: Path, server: LoopbackServer) -> None:
    urls = _jsonl(tmp_path / "urls.jsonl", _images(server, 2) + ["ftp://x/y.jpg", server.base + "/nope.jpg"])
    code, out, _ = _run(str(urls), "-o", str(tmp_path / "a"), "--processes", "1")
    assert code == 0
    assert "failures by reason" in out and "bad_url" in out and "http_4xx" in out and "2 ok (50.0%)" in out
    code, out, err = _run(str(urls), "-o", str(tmp_path / "b"), "--processes", "1", "--quiet")
    assert code == 0 and out == "" and "rows done" not in err


def test_preset_and_column_flags(tmp_path: Path, server: LoopbackServer) -> None:
    urls = _images(server, 3)
    laion = tmp_path / "laion.parquet"
    pq.write_table(pa.table({"URL": urls, "TEXT": ["a", "b", "c"], "similarity": [0.3, 0.4, 0.5]}), laion)
    code, out, _ = _run(
        str(laion), "-o", str(tmp_path / "l"), "--preset", "laion", "--processes", "1", "--json"
    )
    assert code == 0 and json.loads(out)["run"]["successes"] == 3

    table = tmp_path / "list.csv"
    with open(table, "w", newline="") as f:
        csv.writer(f).writerows([["link", "alt"], *[[u, f"alt {i}"] for i, u in enumerate(urls)]])
    code, out, _ = _run(
        str(table),
        "-o",
        str(tmp_path / "c"),
        "--url-col",
        "link",
        "--caption-col",
        "alt",
        "--processes",
        "1",
        "--json",
    )
    assert code == 0 and json.loads(out)["run"]["successes"] == 3
    captions = pq.read_table(tmp_path / "c" / "00000.parquet").column("caption").to_pylist()
    assert captions == ["alt 0", "alt 1", "alt 2"]


def test_image_and_fetch_flags(tmp_path: Path, server: LoopbackServer) -> None:
    urls = _jsonl(
        tmp_path / "urls.jsonl",
        _images(server, 2)
        + [
            server.add_image("small.jpg", make_jpeg(40, 30)),
            server.add_image("slow.jpg", make_jpeg(64, 64), delay=2.0),
        ],
    )
    code, out, _ = _run(
        str(urls),
        "-o",
        str(tmp_path / "out"),
        "--resize-mode",
        "center_crop",
        "--image-size",
        "32",
        "--jpeg-quality",
        "50",
        "--min-image-size",
        "50",
        "--timeout",
        "0.3",
        "--processes",
        "1",
        "--threads",
        "2",
        "--json",
    )
    assert code == 0
    assert json.loads(out)["run"]["error_kinds"] == {"too_small": 1, "timeout": 1}
    assert _sample_sizes(tmp_path / "out") == {(32, 32)}
    saved = yaml.safe_load((tmp_path / "out" / "download_config.yaml").read_text())
    assert saved["image"] == {
        **saved["image"],
        "resize_mode": "center_crop",
        "jpeg_quality": 50,
        "min_size": 50,
    }
    # the transient timeout is fetched again, and succeeds once the server is quick
    server.routes["/img/slow.jpg"].delay = 0.0
    code, out, _ = _run(
        str(urls),
        "-o",
        str(tmp_path / "out"),
        "--resize-mode",
        "center_crop",
        "--image-size",
        "32",
        "--jpeg-quality",
        "50",
        "--min-image-size",
        "50",
        "--processes",
        "1",
        "--retry-failed",
        "--json",
    )
    assert code == 0 and json.loads(out)["run"] == {**json.loads(out)["run"], "rows": 1, "successes": 1}


def test_recipe_with_overrides(tmp_path: Path, server: LoopbackServer) -> None:
    urls = _jsonl(tmp_path / "urls.jsonl", _images(server, 3))
    recipe = tmp_path / "dl.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {"inputs": [str(urls)], "output": str(tmp_path / "out"), "processes": 1, "image": {"size": 40}}
        )
    )
    code, out, _ = _run(
        "--config", str(recipe), "fetch.max_per_host=1", "image.resize_mode=keep_ratio", "--json"
    )
    assert code == 0 and json.loads(out)["run"]["successes"] == 3
    assert _sample_sizes(tmp_path / "out") == {(53, 40)}  # 120x90 → short side 40
    saved = yaml.safe_load((tmp_path / "out" / "download_config.yaml").read_text())
    assert saved["fetch"]["max_per_host"] == 1
    # the saved config is itself a recipe that resumes the run
    code, out, _ = _run("--config", str(tmp_path / "out" / "download_config.yaml"), "--json")
    assert code == 0 and json.loads(out)["shards"]["skipped"] == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["missing.jsonl"], "missing.jsonl: no such input file"),
        ([], "no input URL list"),
        (["{list}", "--url-col", "link"], "no URL column link"),
        (["{list}", "fetch.timout=3"], "did you mean 'fetch.timeout'"),
        (["{list}", "--shard-size", "0"], "shard_size: must be at least 1"),
        (["{bad}"], "unknown URL list format"),
    ],
)
def test_usage_errors_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    good = _jsonl(tmp_path / "urls.jsonl", ["http://127.0.0.1:9/x.jpg"])
    bad = tmp_path / "urls.xml"
    bad.write_text("<x/>")
    args = [a.format(list=good, bad=bad) for a in args]
    code, _, err = _run(*args, "-o", str(tmp_path / "out"), "--processes", "1")
    assert code == 2 and message in err and err.startswith("error: ")


def test_a_failed_first_start_does_not_block_the_corrected_command(
    tmp_path: Path, server: LoopbackServer
) -> None:
    urls = _jsonl(tmp_path / "urls.jsonl", _images(server, 2))
    out = str(tmp_path / "out")
    code, _, err = _run(str(urls), "-o", out, "--url-col", "link", "--processes", "1")
    assert code == 2 and "no URL column link" in err
    assert not (tmp_path / "out").exists()  # checked before anything is written
    (tmp_path / "out").mkdir()  # a start that failed later (e.g. a .json list, read when reached) leaves:
    (tmp_path / "out" / "download_config.yaml").write_text(yaml.safe_dump({"url_col": "link"}))
    code, stdout, err = _run(str(urls), "-o", out, "--processes", "1", "--json")  # the corrected command
    assert code == 0, err
    assert json.loads(stdout)["run"]["successes"] == 2
    saved = yaml.safe_load((tmp_path / "out" / "download_config.yaml").read_text())
    assert saved["url_col"] is None  # the settings that wrote the shards are the ones saved


def _unwritable_folder(tmp_path: Path) -> str:
    """An existing folder this process cannot create files in (root ignores permission bits: use /proc)."""
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        (folder / "probe").write_text("")
    except OSError:
        return str(folder)
    return "/proc"


@pytest.mark.parametrize(
    ("where", "message"),
    [
        ("file", "is a file"),
        ("file/under", "cannot create the output folder"),
        ("unwritable", "cannot write to the output folder"),
    ],
)
def test_bad_output_paths_exit_2_in_one_line(tmp_path: Path, where: str, message: str) -> None:
    urls = _jsonl(tmp_path / "urls.jsonl", ["http://127.0.0.1:9/x.jpg"])
    (tmp_path / "file").write_text("not a folder")
    out = _unwritable_folder(tmp_path) if where == "unwritable" else str(tmp_path / where)
    proc = subprocess.run([*MGPT4, "download", str(urls), "-o", out, "--processes", "1"],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and message in proc.stderr and out in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert (tmp_path / "file").read_text() == "not a folder"


@pytest.mark.parametrize("override", ["shard_size=[1,", "image={size: 3", "fetch.timeout=[", "inputs='x"])
def test_malformed_yaml_override_exits_2_in_one_line(tmp_path: Path, override: str) -> None:
    urls = _jsonl(tmp_path / "urls.jsonl", ["http://127.0.0.1:9/x.jpg"])
    proc = subprocess.run([*MGPT4, "download", str(urls), "-o", str(tmp_path / "out"), override],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    key = override.partition("=")[0]
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"error: override {key}: not valid YAML")
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_changed_settings_exit_2(tmp_path: Path, server: LoopbackServer) -> None:
    urls = _jsonl(tmp_path / "urls.jsonl", _images(server, 1))
    assert _run(str(urls), "-o", str(tmp_path / "out"), "--processes", "1", "--quiet")[0] == 0
    code, _, err = _run(str(urls), "-o", str(tmp_path / "out"), "--processes", "1", "--image-size", "128")
    assert code == 2 and "another output folder" in err


def _start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [*MGPT4, "download", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _wait_for_journal(out: Path, lines: int, proc: subprocess.Popen) -> None:
    journal = out / "00000_journal.jsonl"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and proc.poll() is None:
        if journal.is_file() and len(journal.read_text().splitlines()) >= lines:
            return
        time.sleep(0.02)
    raise AssertionError(f"no progress in {journal} (exit {proc.poll()})")


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow  # real processes, killed and rerun: 3-25 s each on 2 busy cores
@pytest.mark.parametrize("how", ["SIGKILL", "SIGINT"])
def test_killed_run_leaves_only_complete_shards_and_resumes(
    tmp_path: Path, server: LoopbackServer, how: str
) -> None:
    urls = _jsonl(tmp_path / "urls.jsonl", _images(server, 60, delay=0.03))
    out = tmp_path / "out"
    args = [str(urls), "-o", str(out), "--threads", "2", "--processes", "2"]
    proc = _start(args)
    _wait_for_journal(out, 12, proc)
    workers = _children(proc.pid)
    assert len(workers) == 2
    proc.send_signal(getattr(signal, how))
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == (130 if how == "SIGINT" else -signal.SIGKILL)
    if how == "SIGINT":
        assert "interrupted" in err
    deadline = time.monotonic() + 10  # orphaned workers (kill -9) exit by themselves, releasing the folder
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in workers)
    assert not list(out.glob("*.tar")) and not list(out.glob("*_stats.json"))  # nothing half-done looks done
    assert (out / "00000.tar.partial").is_file()
    journaled = {json.loads(line)["url"] for line in (out / "00000_journal.jsonl").read_text().splitlines()}
    before = dict(server.hits)

    proc = _start(args)
    stdout, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "folder total: 60 images from 60 rows in 1 complete shards" in stdout
    assert "rows done" in err  # not a TTY: plain progress lines on stderr, no bar
    stats = json.loads((out / "00000_stats.json").read_text())
    assert stats["count"] == stats["successes"] == 60
    again = [p for p, n in server.hits.items() if n > before.get(p, 0) and server.base + p in journaled]
    assert again == []  # rows finished before the kill were not fetched again


def test_console_script_help() -> None:
    proc = subprocess.run([*MGPT4, "download", "--help"], capture_output=True, text=True, env={**os.environ})
    assert proc.returncode == 0
    for flag in (
        "--url-col",
        "--caption-col",
        "--preset",
        "--shard-size",
        "--image-size",
        "--resize-mode",
        "--processes",
        "--threads",
        "--retry-failed",
        "--quiet",
        "--json",
        "--out",
        "--config",
    ):
        assert flag in proc.stdout
