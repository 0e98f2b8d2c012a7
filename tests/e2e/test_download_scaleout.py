"""`mgpt4 download` scaled out, with real parts, killed mid-run: every input row ends up exactly once.

- Ray: a real local cluster started by the command (`--distributor ray`); a worker process running a
  shard is SIGKILLed and Ray's retry finishes the shard from the files the dead worker left.
- Many machines without Ray: `--node-rank R --num-nodes 2` as two processes, one SIGKILLed and rerun,
  then `mgpt4 download report` merges the folder.
- S3: output and input on a real S3 API (moto's server on 127.0.0.1, reached by s3fs in a subprocess),
  SIGKILLed mid-shard and mid-publish, resumed, then `--retry-failed`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
from helpers.loopback_http import LoopbackServer, make_jpeg
from helpers.shard_checks import count_folder

from mgpt4.download.shard_download import shard_key

MGPT4 = [sys.executable, "-c", "from mgpt4.cli import main; main()"]
KILL_AT = Path(__file__).resolve().parents[1] / "helpers" / "kill_at.py"


@pytest.fixture
def server():
    with LoopbackServer() as srv:
        yield srv


def _url_list(path: Path, urls: list[str]) -> Path:
    path.write_text("".join(json.dumps({"url": u, "caption": f"c{i}"}) + "\n" for i, u in enumerate(urls)))
    return path


def _journaled(journal: Path) -> list[dict]:
    try:
        lines = journal.read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            pass  # the line being written
    return out


def _wait(condition, proc: subprocess.Popen, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode} before {what}: {proc.stderr.read()[-3000:]}")
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def _assert_all_rows_once(out: str, rows: int, shard_size: int) -> None:
    counts = count_folder(out)
    assert counts.rows == rows and counts.successes == rows and counts.leftovers == []
    assert sorted(counts.keys) == sorted(
        shard_key(i // shard_size, i % shard_size, shard_size) for i in range(rows)
    )


# --------------------------------------------------------------------------------------------------
# Ray
# --------------------------------------------------------------------------------------------------


def _ray_task_pids() -> list[int]:
    """Ray worker processes now running a shard task (Ray titles them ``ray::<function name>``)."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if cmdline.read_bytes().startswith(b"ray::_shard_task"):
                pids.append(int(cmdline.parent.name))
        except OSError:
            continue
    return pids


@pytest.mark.slow  # a Ray cluster starts in ~10 s, 20+ s on a busy 2-core machine
def test_ray_worker_killed_mid_shard_every_row_once(tmp_path: Path, server: LoopbackServer) -> None:
    pytest.importorskip("ray")
    n, size = 48, 12
    urls = [server.add_image(f"{i}.jpg", make_jpeg(48, 40, seed=i), delay=0.25) for i in range(n)]
    url_list = _url_list(tmp_path / "urls.jsonl", urls)
    out = tmp_path / "out"
    ray_tmp = tempfile.mkdtemp(prefix="r", dir="/tmp")  # Ray's socket paths must stay under 107 bytes
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "RAY_AUTH_MODE": "disabled"}
    cmd = [
        *MGPT4,
        "download",
        str(url_list),
        "-o",
        str(out),
        "--shard-size",
        str(size),
        "--processes",
        "2",
        "--threads",
        "2",
        "--image-size",
        "32",
        "--distributor",
        "ray",
        "--json",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        journals = lambda: [p for p in out.glob("*_journal.jsonl") if len(_journaled(p)) >= 3]  # noqa: E731
        _wait(lambda: journals() and _ray_task_pids(), proc, "a shard task with 3 rows done")
        victim = _ray_task_pids()[0]
        before = {p.name: _journaled(p) for p in out.glob("*_journal.jsonl")}
        os.kill(victim, signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, stderr[-3000:]
    assert not Path(f"/proc/{victim}").exists() or b"Z" in Path(f"/proc/{victim}/stat").read_bytes()
    assert "worker died or was killed while executing a task" in stderr  # Ray saw a task die and retried it
    summary = json.loads(stdout)
    assert summary["shards"] == {"written": n // size, "skipped": 0, "incomplete": 0}
    assert summary["dataset"] == {"shards": n // size, "rows": n, "successes": n}
    _assert_all_rows_once(str(out), n, size)
    stored = [r["url"] for records in before.values() for r in records if r["status"] == "success"]
    assert stored and all(
        server.hits[u.removeprefix(server.base)] == 1 for u in stored
    )  # salvaged, not refetched


# --------------------------------------------------------------------------------------------------
# --node-rank / --num-nodes
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow  # two node processes, one killed and rerun: 4-7 s on 2 busy cores
def test_two_nodes_one_killed_and_rerun_then_report_merges(tmp_path: Path, server: LoopbackServer) -> None:
    n, size = 40, 10
    urls = [server.add_image(f"{i}.jpg", make_jpeg(48, 40, seed=i), delay=0.05) for i in range(n)]
    url_list = _url_list(tmp_path / "urls.jsonl", urls)
    out = tmp_path / "out"

    def node(rank: int) -> list[str]:
        return [
            *MGPT4,
            "download",
            str(url_list),
            "-o",
            str(out),
            "--shard-size",
            str(size),
            "--processes",
            "1",
            "--threads",
            "2",
            "--image-size",
            "32",
            "--node-rank",
            str(rank),
            "--num-nodes",
            "2",
            "--json",
        ]

    first = subprocess.Popen(node(0), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    second = subprocess.Popen(node(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait(lambda: len(_journaled(out / "00001_journal.jsonl")) >= 3, second, "node 1's first rows")
    second.send_signal(signal.SIGKILL)
    second.wait(timeout=30)
    stdout, stderr = first.communicate(timeout=120)
    assert first.returncode == 0, stderr
    assert json.loads(stdout)["shards"]["written"] == 2  # shards 0 and 2: every other one

    report = subprocess.run(
        [*MGPT4, "download", "report", "-o", str(out), "--json"], capture_output=True, text=True
    )
    partial = json.loads(report.stdout)
    assert partial["shards"]["written"] == 2 and partial["shards"]["incomplete"] == 1
    assert partial["shards"]["missing"] == 1  # shard 3: node 1 never reached it

    rerun = subprocess.run(node(1), capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert json.loads(rerun.stdout)["shards"] == {"written": 2, "skipped": 0, "incomplete": 0}

    report = subprocess.run([*MGPT4, "download", "report", "-o", str(out)], capture_output=True, text=True)
    assert report.returncode == 0, report.stderr
    shown = " ".join(report.stdout.split())  # rich wraps at the terminal width
    assert "40 rows in complete shards" in shown and "4 complete, 0 incomplete, 0 not started" in shown
    merged = json.loads(
        subprocess.run(
            [*MGPT4, "download", "report", "-o", str(out), "--json"], capture_output=True, text=True
        ).stdout
    )
    assert merged["run"]["rows"] == n and merged["run"]["successes"] == n and merged["dataset"]["shards"] == 4
    _assert_all_rows_once(str(out), n, size)


# --------------------------------------------------------------------------------------------------
# S3 (moto's server)
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def s3_env():
    """A moto S3 server on 127.0.0.1 with one bucket, and the environment that points s3fs at it."""
    moto_server = pytest.importorskip("moto.server")
    s3fs = pytest.importorskip("s3fs")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "FSSPEC_S3_ENDPOINT_URL": f"http://{host}:{port}",
    }
    fs = s3fs.S3FileSystem(key="testing", secret="testing", endpoint_url=env["FSSPEC_S3_ENDPOINT_URL"])
    bucket = f"shards-{uuid.uuid4().hex[:8]}"  # moto keeps its buckets for the whole test process
    fs.mkdir(bucket)
    import fsspec.config

    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # count_folder reads s3:// through fsspec in this process too
    fsspec.config.conf["s3"] = {"endpoint_url": env["FSSPEC_S3_ENDPOINT_URL"]}  # env is read at import only
    try:
        yield {**os.environ, **env}, fs, bucket
    finally:
        fsspec.config.conf.pop("s3", None)
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


def _s3_download(env: dict, bucket: str, *args: str, kill: str | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(KILL_AT), kill, "--"] if kill else MGPT4
    base = [
        "download",
        f"s3://{bucket}/in/urls.jsonl",
        "-o",
        f"s3://{bucket}/laion",
        "--shard-size",
        "10",
        "--processes",
        "1",
        "--threads",
        "2",
        "--image-size",
        "32",
        "fetch.retries=0",
        "checkpoint_seconds=0.05",
        "--json",
    ]
    return subprocess.run([*cmd, *base, *args], capture_output=True, text=True, timeout=180, env=env)


@pytest.mark.slow  # ~10 s each alone, ~20 s on a busy 2-core machine (five CLI processes and an S3 server)
@pytest.mark.parametrize(
    "kill",
    [
        pytest.param("addfile:25", id="mid-shard (staged rows, some uploaded by a checkpoint)"),
        pytest.param("after-mv:00001.tar", id="mid-publish: tar in place, parquet and stats not"),
    ],
)
def test_s3_output_killed_resumes_then_retries_failures(
    tmp_path: Path, server: LoopbackServer, s3_env: tuple[dict, object, str], kill: str
) -> None:
    env, fs, bucket = s3_env
    out = f"s3://{bucket}/laion"
    good = [server.add_image(f"{i}.jpg", make_jpeg(48, 40, seed=i), delay=0.02) for i in range(27)]
    busy = [
        server.add(f"/busy/{i}.jpg", body=make_jpeg(48, 40, seed=90 + i), fail_first=10**6, fail_status=503)
        for i in range(3)
    ]
    rows = good[:15] + busy + good[15:]
    fs.put(str(_url_list(tmp_path / "urls.jsonl", rows)), f"{bucket}/in/urls.jsonl")  # the input is on S3 too

    killed = _s3_download(env, bucket, kill=kill)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    fs.invalidate_cache()
    names = {p.rsplit("/", 1)[-1] for p in fs.ls(f"{bucket}/laion", detail=False)}
    assert "00002_stats.json" not in names  # a kill left the run unfinished
    journaled = set()
    for name in names:
        if name.endswith("_journal.jsonl"):
            for line in fs.cat_file(f"{bucket}/laion/{name}").decode().splitlines():
                try:
                    journaled.add(json.loads(line)["url"].removeprefix(server.base))
                except ValueError:
                    pass
    hits = dict(server.hits)

    resumed = _s3_download(env, bucket)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    refetched = [
        p for p, n in server.hits.items() if n > hits.get(p, 0) and p in journaled and "/busy" not in p
    ]
    assert refetched == []  # rows the remote journal holds are not fetched again
    counts = count_folder(out)
    assert counts.rows == 30 and counts.successes == 27 and counts.leftovers == []

    for url in busy:
        server.routes[url.removeprefix(server.base)].fail_first = 0
    stored = counts.jpegs
    retried = _s3_download(env, bucket, "--retry-failed")
    assert retried.returncode == 0, retried.stderr[-3000:]
    assert json.loads(retried.stdout)["run"] == {
        **json.loads(retried.stdout)["run"],
        "rows": 3,
        "successes": 3,
    }
    _assert_all_rows_once(out, 30, 10)
    assert all(count_folder(out).jpegs[k] == v for k, v in stored.items())
    report = subprocess.run(
        [*MGPT4, "download", "report", "-o", out, "--json"], capture_output=True, text=True, env=env
    )
    assert json.loads(report.stdout)["dataset"] == {"shards": 3, "rows": 30, "successes": 30}


@pytest.mark.slow  # a Ray head plus two downloads through it: ~40 s on 2 busy cores
def test_ray_recipe_joins_a_running_cluster_and_a_local_run_starts_its_own(
    tmp_path: Path, server: LoopbackServer
) -> None:
    """The README's recipe: `ray start --head`, then `--ray-address auto` joins that cluster; without an
    address the command starts a fresh local one instead of tripping over the running one."""
    pytest.importorskip("ray")
    n, size = 8, 4
    urls = [server.add_image(f"{i}.jpg", make_jpeg(48, 40, seed=i)) for i in range(n)]
    url_list = _url_list(tmp_path / "urls.jsonl", urls)
    ray_tmp = tempfile.mkdtemp(prefix="r", dir="/tmp")  # Ray's socket paths must stay under 107 bytes
    env = {**os.environ, "RAY_TMPDIR": ray_tmp}
    ray_cli = str(Path(sys.executable).parent / "ray")
    head = subprocess.Popen(
        [ray_cli, "start", "--head", "--block", "--port=0", "--num-cpus=2", "--include-dashboard=false",
         f"--temp-dir={ray_tmp}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip

    def sessions() -> list[str]:  # the head's (under --temp-dir) and a local run's (under RAY_TMPDIR/ray)
        return sorted(
            p.name for p in [*Path(ray_tmp).glob("session_2*"), *Path(ray_tmp).glob("ray/session_2*")]
        )

    try:
        _wait(lambda: sessions() and list(Path(ray_tmp).glob("session_latest/logs/raylet.out")), head,
              "the Ray head")  # fmt: skip
        time.sleep(3)  # the raylet registers its CPUs after it starts logging
        first = sessions()
        for name, extra in (("joined", ["--ray-address", "auto"]), ("local", [])):
            out = tmp_path / name
            cmd = [*MGPT4, "download", str(url_list), "-o", str(out), "--shard-size", str(size),
                   "--processes", "2", "--threads", "2", "--image-size", "32", "--distributor", "ray",
                   "--json", *extra]  # fmt: skip
            done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
            assert done.returncode == 0, done.stderr[-3000:]
            assert json.loads(done.stdout)["dataset"] == {"shards": n // size, "rows": n, "successes": n}
            _assert_all_rows_once(str(out), n, size)
            if name == "joined":
                assert sessions() == first  # ran inside the head's session, started no cluster
        assert len(sessions()) == len(first) + 1  # the address-less run started (and left) its own
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=60)
        shutil.rmtree(ray_tmp, ignore_errors=True)
