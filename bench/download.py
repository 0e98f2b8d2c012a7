"""Benchmark: `mgpt4 download` vs img2dataset 1.47 on the same URL list, served over loopback.

    python bench/download.py                      # 5,000 images, 2 processes x 16 threads, 224 px
    python bench/download.py --images 1000 --repeat 2
    python bench/download.py --distributor ray    # mgpt4 on a local Ray cluster vs mgpt4's own processes

One HTTP/1.1 server on 127.0.0.1 (in this process, in threads) serves N real JPEGs of random sizes
(~50 KB each). img2dataset is installed into its own venv (bench/.venv-img2dataset, git-ignored) on
first use. Both tools get the same list (parquet: url, caption), image size, resize mode (border),
JPEG quality (95), shard size, processes and threads; each run starts from an empty output folder.
images/s = successful images / wall-clock seconds of the whole command (start-up included), with
successes counted from the *_stats.json files both tools write. Prints both rates and the ratio.
img2dataset runs with its own defaults otherwise (e.g. EXIF extraction and sha256 on, as a user gets).
``--no-keep-alive`` makes the server close every connection, taking connection reuse out of the race.

``--distributor ray`` compares the engines instead of the tools: the same mgpt4 command with one Ray task
per shard against its local worker processes, twice: ``ray`` starts a local cluster of ``--processes``
CPUs inside the command (what a one-machine user pays), ``ray-cluster`` joins one started beforehand with
``ray start --head`` (what a multi-node user's command pays: the cluster outlives it). Besides the whole
command's wall clock it prints the rate over the
shards' own span (first shard start to last shard end, from the _stats.json files), which is what a
long run converges to. ``--save FILE`` writes the numbers and the machine's load as JSON.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

HERE = Path(__file__).resolve().parent
IMG2DATASET_VERSION = "1.47.0"


_NOISE: np.ndarray | None = None


def _make_image(args: tuple[int, int]) -> bytes:
    """A photo-like JPEG: gradients, blobs and mild sensor noise; random size between 256 and 1024 px."""
    global _NOISE
    index, seed = args
    rng = np.random.default_rng(seed * 1_000_003 + index)
    if _NOISE is None:  # one noise field per process, cut at random offsets: generating it is the slow part
        _NOISE = np.random.default_rng(seed).normal(0, 4, (2048, 2048, 3)).astype(np.float32)
    w, h = (int(v) for v in rng.integers(256, 1025, 2))
    x = np.linspace(0, 1, w, dtype=np.float32)[None, :]
    y = np.linspace(0, 1, h, dtype=np.float32)[:, None]
    c = rng.uniform(0.2, 1.0, 3).astype(np.float32)
    rgb = np.stack([c[0] * x + 0 * y, c[1] * y + 0 * x, c[2] * (1 - x * y)], axis=-1) * 255
    for _ in range(12):
        cx, cy, r = (int(v) for v in (rng.integers(0, w), rng.integers(0, h), rng.integers(8, 200)))
        x0, x1, y0, y1 = max(cx - r, 0), min(cx + r, w), max(cy - r, 0), min(cy + r, h)
        yy, xx = np.ogrid[y0:y1, x0:x1]
        rgb[y0:y1, x0:x1][((xx - cx) ** 2 + (yy - cy) ** 2) < r * r] = rng.uniform(0, 255, 3)
    ox, oy = (int(v) for v in rng.integers(0, 2048 - 1024, 2))
    rgb += _NOISE[oy : oy + h, ox : ox + w]
    out = io.BytesIO()
    Image.fromarray(rgb.clip(0, 255).astype(np.uint8)).save(out, "JPEG", quality=85)
    return out.getvalue()


def make_images(count: int, seed: int, cache_dir: Path) -> list[bytes]:
    """Generate (or load from the git-ignored cache) ``count`` JPEGs."""
    cache = cache_dir / f"images-{count}-{seed}.pkl"
    if cache.is_file():
        return pickle.loads(cache.read_bytes())
    with ProcessPoolExecutor() as pool:
        images = list(pool.map(_make_image, [(i, seed) for i in range(count)], chunksize=64))
    cache_dir.mkdir(parents=True, exist_ok=True)
    cache.write_bytes(pickle.dumps(images))
    return images


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024  # img2dataset opens a new connection per image: a deep backlog keeps SYNs

    def handle_error(self, request: object, client_address: object) -> None:
        pass


def serve(images: list[bytes], keep_alive: bool = True) -> tuple[_Server, str]:
    """Start the loopback image server; returns it and its base URL."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive for clients that want it (urllib asks to close)
        disable_nagle_algorithm = True  # as real servers do (nginx tcp_nodelay on)

        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            try:
                body = images[int(self.path.rsplit("/", 1)[-1].split(".")[0])]
            except (ValueError, IndexError):
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            if not keep_alive:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            self.wfile.write(body)

    server = _Server(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def ensure_img2dataset(venv: Path) -> Path:
    """The img2dataset executable, installing it into its own venv on first use."""
    exe = venv / "bin" / "img2dataset"
    if exe.is_file():
        return exe
    print(f"installing img2dataset=={IMG2DATASET_VERSION} into {venv} (once) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", f"img2dataset=={IMG2DATASET_VERSION}"], check=True
    )
    return exe


def count_successes(folder: Path) -> tuple[int, int]:
    """(successes, rows) summed over the *_stats.json files (the same format for both tools)."""
    ok = rows = 0
    for f in folder.glob("*_stats.json"):
        stats = json.loads(f.read_text())
        ok += stats["successes"]
        rows += stats["count"]
    return ok, rows


def shard_span(folder: Path) -> float:
    """Seconds from the first shard's start to the last shard's end (mgpt4's _stats.json files)."""
    stats = [json.loads(f.read_text()) for f in folder.glob("*_stats.json")]
    return max(s["end_time"] for s in stats) - min(s["start_time"] for s in stats) if stats else 0.0


def timed(cmd: list[str], out: Path, env: dict[str, str]) -> tuple[float, int, int]:
    """Run ``cmd`` into an empty ``out``; returns (wall seconds, successes, rows)."""
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{cmd[0]} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    ok, rows = count_successes(out)
    return seconds, ok, rows


def mgpt4_command(args: argparse.Namespace, url_list: Path, out: Path, *extra: str) -> list[str]:
    """``mgpt4 download`` with the benchmark's list, size, shards and parallelism."""
    ours = (
        f"{Path(sys.executable).parent / 'mgpt4'} download {url_list} -o {out} "
        f"--processes {args.processes} --threads {args.threads} --image-size {args.image_size} "
        f"--resize-mode border --jpeg-quality 95 --shard-size {args.shard_size} --timeout 10 --quiet"
    )
    return [*ours.split(), *extra]


def start_ray_cluster(cpus: int) -> tuple[subprocess.Popen, str]:
    """``ray start --head --block`` on a free port, as a cluster exists before a multi-node user's command.

    ``--block`` keeps the head in the foreground, so terminating it stops only this cluster (``ray stop``
    would stop every Ray process on the machine).
    """
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ray = str(Path(sys.executable).parent / "ray")
    cmd = [
        ray,
        "start",
        "--head",
        "--block",
        f"--port={port}",
        f"--num-cpus={cpus}",
        "--include-dashboard=false",
    ]
    head = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                time.sleep(5)  # the GCS answers before the raylet has registered its CPUs
                return head, f"127.0.0.1:{port}"
        time.sleep(0.5)
    head.kill()
    sys.exit("ray start --head did not open its port within 120 s")


def compare_distributors(args: argparse.Namespace, url_list: Path, env: dict[str, str]) -> None:
    """mgpt4 on a local Ray cluster vs mgpt4's local processes: wall clock and shard-span rates."""
    load_before = os.getloadavg()
    head, _ = start_ray_cluster(args.processes)
    modes = {
        "processes": (),
        "ray": ("--distributor", "ray"),
        # "auto" as the README's recipe: the newest cluster started on this machine (ours), joined with
        # the token Ray >= 2.59 sets up for `ray start` clusters; an explicit HOST:PORT also needs
        # RAY_AUTH_MODE=token in the environment.
        "ray-cluster": ("--distributor", "ray", "--ray-address", "auto"),
    }
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in modes}
    try:
        for run in range(args.repeat):
            for name, extra in modes.items():
                out = args.work / f"mgpt4-{name}"
                seconds, ok, rows = timed(mgpt4_command(args, url_list, out, *extra), out, env)
                span = shard_span(out)
                runs[name].append({"seconds": seconds, "span": span, "ok": ok, "rows": rows})
                print(
                    f"run {run + 1} {name:<11} {seconds:7.2f} s wall ({ok / seconds:7.1f} img/s), "
                    f"shards span {span:6.2f} s ({ok / span:7.1f} img/s), {ok}/{rows} ok",
                    flush=True,
                )
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # the head and the workers it started
        head.wait()

    def best_rate(name: str, time_key: str) -> float:
        return max(r["ok"] / r[time_key] for r in runs[name])

    wall_ratio = best_rate("ray", "seconds") / best_rate("processes", "seconds")
    cluster_ratio = best_rate("ray-cluster", "seconds") / best_rate("processes", "seconds")
    span_ratio = best_rate("ray", "span") / best_rate("processes", "span")
    load_after = os.getloadavg()
    print(
        f"\n{args.images} images, {args.processes} CPUs x {args.threads} threads, {args.image_size} px "
        f"border, shard size {args.shard_size}, {os.cpu_count()} CPU cores, load average "
        f"{load_before[0]:.1f} before, {load_after[0]:.1f} after"
    )
    print(f"ratio ray / processes, whole command (Ray start-up included): {wall_ratio:.2f}x")
    print(f"ratio ray / processes, whole command joining a running cluster: {cluster_ratio:.2f}x")
    print(f"ratio ray / processes, over the shards' span:                 {span_ratio:.2f}x")
    if args.save:
        args.save.parent.mkdir(parents=True, exist_ok=True)
        result = {
            "benchmark": "bench/download.py --distributor ray",
            "images": args.images, "processes": args.processes, "threads": args.threads,
            "image_size": args.image_size, "shard_size": args.shard_size, "cpu_count": os.cpu_count(),
            "load_average_before": load_before, "load_average_after": load_after,
            "runs": runs, "ratio_wall": wall_ratio, "ratio_wall_running_cluster": cluster_ratio,
            "ratio_shard_span": span_ratio,
        }  # fmt: skip
        args.save.write_text(json.dumps(result, indent=2) + "\n")
        print(f"saved {args.save}")


def commands(
    args: argparse.Namespace, url_list: Path, img2dataset: Path
) -> dict[str, tuple[list[str], Path]]:
    """The two command lines, with the same list, size, resize mode, quality, shards and parallelism."""
    i2d_out, mgpt4_out = args.work / "img2dataset", args.work / "mgpt4"
    i2d = (
        f"{img2dataset} --url_list {url_list} --input_format parquet --url_col url --caption_col caption "
        f"--output_format webdataset --output_folder {i2d_out} --processes_count {args.processes} "
        f"--thread_count {args.threads} --image_size {args.image_size} --resize_mode border "
        f"--encode_quality 95 --number_sample_per_shard {args.shard_size} --timeout 10 "
        "--enable_wandb False --distributor multiprocessing"
    )
    ours = mgpt4_command(args, url_list, mgpt4_out)
    return {"img2dataset": (i2d.split(), i2d_out), "mgpt4": (ours, mgpt4_out)}


def report(args: argparse.Namespace, best: dict[str, tuple[float, int, int]]) -> None:
    """Print the best run of each tool, and the ratio of their rates."""
    print(
        f"\n{args.images} images, {args.processes} processes x {args.threads} threads, "
        f"{args.image_size} px border, shard size {args.shard_size}, {os.cpu_count()} CPU cores, "
        f"server keep-alive {'off' if args.no_keep_alive else 'on'}"
    )
    print(f"{'tool':<12} {'seconds':>8} {'ok':>7} {'img/s':>9}")
    for name, (seconds, ok, _) in best.items():
        print(f"{name:<12} {seconds:8.2f} {ok:7d} {ok / seconds:9.1f}")
    i2d, ours = best["img2dataset"], best["mgpt4"]
    ratio = (ours[1] / ours[0]) / (i2d[1] / i2d[0]) if i2d[1] else float("inf")
    same = "identical" if ours[1] == i2d[1] else f"DIFFERENT ({ours[1]} vs {i2d[1]})"
    print(f"ratio mgpt4 / img2dataset: {ratio:.2f}x   success counts: {same}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--repeat", type=int, default=1, help="runs per tool (alternating); the best counts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-keep-alive", action="store_true", help="server closes every connection")
    parser.add_argument("--venv", type=Path, default=HERE / ".venv-img2dataset")
    parser.add_argument("--work", type=Path, default=HERE / "out" / "download")
    parser.add_argument(
        "--distributor", choices=["multiprocessing", "ray"], default="multiprocessing",
        help="ray: compare mgpt4 on a local Ray cluster with mgpt4's local processes (not img2dataset)",
    )  # fmt: skip
    parser.add_argument("--save", type=Path, help="write the numbers as JSON (e.g. bench/results/NAME.json)")
    args = parser.parse_args()

    img2dataset = None if args.distributor == "ray" else ensure_img2dataset(args.venv)
    images = make_images(args.images, args.seed, args.work.parent)
    print(f"{len(images)} images, mean {sum(map(len, images)) / len(images) / 1024:.1f} KB", flush=True)
    server, base = serve(images, keep_alive=not args.no_keep_alive)
    url_list = args.work / "urls.parquet"
    url_list.parent.mkdir(parents=True, exist_ok=True)
    urls = [f"{base}/img/{i}.jpg" for i in range(len(images))]
    pq.write_table(
        pa.table({"url": urls, "caption": [f"image number {i}" for i in range(len(urls))]}), url_list
    )

    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled"}
    if args.distributor == "ray":
        compare_distributors(args, url_list, env)
        server.shutdown()
        return
    best: dict[str, tuple[float, int, int]] = {}
    for run in range(args.repeat):
        for name, (cmd, out) in commands(args, url_list, img2dataset).items():
            seconds, ok, rows = timed(cmd, out, env)
            print(
                f"run {run + 1} {name:<12} {seconds:7.2f} s  {ok}/{rows} ok  {ok / seconds:8.1f} img/s",
                flush=True,
            )
            if name not in best or seconds < best[name][0]:
                best[name] = (seconds, ok, rows)
    server.shutdown()
    report(args, best)


if __name__ == "__main__":
    main()
