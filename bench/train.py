"""Benchmark `mgpt4 pretrain` (micro stage 1) against a plain PyTorch loop, and the stage-1 loader alone.

    python bench/train.py                         # 5 warm-up + 30 measured steps, micro batch 32
    python bench/train.py --steps 60 --threads 1  # one intra-op thread in both loops
    python bench/train.py --zero zero1            # another ZeRO recipe on the mgpt4 side
    python bench/train.py --loader-only --loader-workers 0,4,8 --loader-batch 64   # on a GPU machine
    python bench/train.py --threads 1 --cli-workers 0,2 --out bench/results/train_loader_cpu_1thread.json

Training: both sides train the micro preset from the ``micro_stage1`` recipe on the same synthetic shards:

  (a) ``mgpt4 pretrain`` in a subprocess — the real CLI path (DeepSpeed ZeRO-2, fp32, the shard mixture,
      per-step metrics, a checkpoint at the end) — once per ``--cli-workers`` value (data.num_workers);
      samples/s from its ``metrics.jsonl``, warm-up steps left out, checkpoint time not counted (it
      happens after the last step's timing);
  (b) in this process: ``build_model`` with the same model config, ``torch.optim.AdamW`` with the same
      hyper-parameters and gradient clipping, batches from ``mgpt4.train.data.make_batches``. Besides its
      samples/s (batch fetch included), it reports the step's *demand*: samples/s of forward, backward and
      optimizer step alone — what a loader must deliver for the step never to wait.

Each step is timed from fetching the batch to the end of the optimizer step on both sides. The sides
alternate for ``--rounds`` rounds and the best rate of each counts (a shared CPU is noisy). It prints
samples/s of each, their ratio (target ≥ 0.9) and the peak RSS of each process.

Loader: stage-1 batches alone (``CaptionBatches``: tar reads, JPEG decode, bicubic resize, normalise,
stack) from shards of ``--loader-image-px`` JPEGs (official shards: 224 px, MG dataset/download_laion.sh
``--image_size 224``; noisy photo-like content, quality 95 as img2dataset writes), transformed to the
official 224 px, for each of ``--loader-workers`` (data.num_workers), beside two references: the same
loader decoding in the training process (workers 0), and a plain ``torch.utils.data.DataLoader`` with
as many workers over a map-style dataset doing the same per-sample work (tar member read by the same
index, ``read_sample``'s JPEG decode, the same transform; shuffled, batched by its default collate).
The two loaders alternate for ``--rounds`` rounds; the best of each counts. Also printed beside the step
demand measured here and, when bench/results/gpu_check_*.json exist, the 7B stage-1 step's samples/s
per GPU measured there — whether the loader keeps up is the ratio of the two.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import platform
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from mgpt4.config import load_config
from mgpt4.data.shards import ShardFile, blip_caption, find_shards, read_sample
from mgpt4.data.synthetic import make_samples
from mgpt4.model.build import build_model
from mgpt4.model.presets import get_preset
from mgpt4.model.vision import image_transform
from mgpt4.train.config import TrainRunConfig
from mgpt4.train.data import CaptionBatches, make_batches

RESULTS = Path(__file__).resolve().parent / "results"


def write_shards(folder: Path, count: int, per_shard: int = 256) -> None:
    """img2dataset-layout shards of the built-in shapes (KEY.jpg/.txt/.json + NNNNN_stats.json)."""
    folder.mkdir(parents=True)
    samples = make_samples(count, split="train")
    for shard_id, start in enumerate(range(0, count, per_shard)):
        chunk = samples[start : start + per_shard]
        with wds.TarWriter(str(folder / f"{shard_id:05d}.tar")) as sink:
            for sample in chunk:
                jpeg = io.BytesIO()
                sample.image.save(jpeg, "JPEG", quality=95)
                meta = json.dumps({"caption": sample.caption, "key": sample.key})
                sink.write({"__key__": sample.key, "jpg": jpeg.getvalue(), "txt": sample.caption,
                            "json": meta})  # fmt: skip
        (folder / f"{shard_id:05d}_stats.json").write_text(json.dumps({"count": len(chunk)}))


def write_photo_shards(folder: Path, count: int, size: int, per_shard: int = 256) -> None:
    """Shards of ``size`` px JPEGs that compress like photos: smooth colour fields plus sensor-like noise."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for shard_id, start in enumerate(range(0, count, per_shard)):
        with wds.TarWriter(str(folder / f"{shard_id:05d}.tar")) as sink:
            for index in range(start, min(count, start + per_shard)):
                coarse = Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8))
                smooth = np.asarray(coarse.resize((size, size), Image.Resampling.BICUBIC), dtype=np.int16)
                pixels = np.clip(smooth + rng.normal(0, 12, smooth.shape), 0, 255).astype(np.uint8)
                jpeg = io.BytesIO()
                Image.fromarray(pixels).save(jpeg, "JPEG", quality=95)
                key = f"{index:09d}"
                caption = f"a photo number {index} of something colourful"
                sink.write({"__key__": key, "jpg": jpeg.getvalue(), "txt": caption,
                            "json": json.dumps({"caption": caption, "key": key})})  # fmt: skip
        (folder / f"{shard_id:05d}_stats.json").write_text(json.dumps({"count": per_shard}))


def overrides(shards: Path, run: Path, args: argparse.Namespace) -> list[str]:
    total = args.warmup + args.steps
    return [
        f"data.shards=[{{path: {shards}}}]", f"out={run}", f"data.micro_batch_size={args.micro_batch_size}",
        f"train.max_steps={total}", "train.log_every=1", f"train.save_every={total}", "train.plot=false",
        f"train.zero={args.zero}",
    ]  # fmt: skip


def rss_mib(kib: int) -> float:
    return kib / 1024  # Linux reports ru_maxrss in KiB


def bench_cli(shards: Path, run: Path, args: argparse.Namespace, workers: int) -> tuple[float, float]:
    """samples/s of ``mgpt4 pretrain`` after warm-up, and the peak RSS (MiB) of its process."""
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    command = [str(Path(sys.executable).with_name("mgpt4")), "pretrain", "--config", "micro_stage1", "-q",
               *overrides(shards, run, args), f"data.num_workers={workers}"]  # fmt: skip
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
    peak = rss_mib(
        max(before, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    )  # largest child so far
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    measured = [m for m in lines if m["step"] > args.warmup]
    seconds = sum(args.micro_batch_size / m["samples_per_s"] for m in measured)
    return len(measured) * args.micro_batch_size / seconds, peak


def bench_plain(shards: Path, run: Path, args: argparse.Namespace) -> tuple[float, float, float]:
    """A plain AdamW loop on the same model and batches: samples/s, the step's demand (samples/s without
    the batch fetch) and this process's peak RSS."""
    cfg = load_config(TrainRunConfig, "micro_stage1", overrides(shards, run, args))
    torch.manual_seed(cfg.train.seed)
    model = build_model(dataclasses.replace(cfg.model, dtype="fp32"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2),
                                  weight_decay=cfg.optim.weight_decay)  # fmt: skip
    batches = make_batches(cfg, model.preset, rank=0, world_size=1)
    seconds, step_seconds, samples = 0.0, 0.0, 0
    for step in range(args.warmup + args.steps):
        started = time.perf_counter()
        batch = batches.next_batch()
        fetched = time.perf_counter()
        loss = model(batch)
        loss.backward()
        if cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= args.warmup:
            seconds += time.perf_counter() - started
            step_seconds += time.perf_counter() - fetched
            samples += len(batch["text"])
    rss = rss_mib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    return samples / seconds, samples / step_seconds, rss


def bench_loader(shards: Path, args: argparse.Namespace, workers: int) -> float:
    """samples/s of stage-1 batches alone (official 224-px transform) with ``workers`` loader processes."""
    overrides = [f"data.shards=[{{path: {shards}}}]", f"data.micro_batch_size={args.loader_batch}"]
    cfg = load_config(TrainRunConfig, "micro_stage1", overrides)
    official = get_preset("vicuna-7b")  # only its image size (224) is used here
    batches = CaptionBatches(cfg, official, 0, 1, num_workers=workers, prefetch=args.loader_prefetch)
    try:
        for _ in range(2):  # worker start-up and the first window
            batches.next_batch()
        started = time.perf_counter()
        for _ in range(args.loader_batches):
            batch = batches.next_batch()
        assert batch["image"].shape[-1] == official.vision.image_size
        return args.loader_batches * args.loader_batch / (time.perf_counter() - started)
    finally:
        batches.close()


class TarSamples(torch.utils.data.Dataset):
    """The reference loader's dataset: every sample of the shards by number, decoded as stage 1 does."""

    def __init__(self, shards: Path, image_size: int) -> None:
        self.samples = []  # (tar path, key, members)
        for path in find_shards(str(shards)):
            index = ShardFile(path, on_skip=None)
            index.close()
            self.samples += [(path, key, members) for key, members in index.samples]
        self.transform = image_transform(image_size)
        self._tars: dict[str, tarfile.TarFile] = {}  # opened in the process that reads (each worker)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        path, key, members = self.samples[index]
        if path not in self._tars:
            self._tars[path] = tarfile.open(path, mode="r:")
        _, image, text = read_sample(self._tars[path], key, members, blip_caption)
        return self.transform(image), text


def bench_torch_loader(shards: Path, args: argparse.Namespace, workers: int) -> float:
    """samples/s of a plain torch DataLoader doing the same per-sample work with ``workers`` processes."""
    dataset = TarSamples(shards, get_preset("vicuna-7b").vision.image_size)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=args.loader_batch, shuffle=True, generator=torch.Generator().manual_seed(0),
        num_workers=workers, prefetch_factor=args.loader_prefetch if workers else None,
    )  # fmt: skip
    batches = iter(loader)
    for _ in range(2):  # worker start-up and the first window, as for mgpt4's loader
        next(batches)
    started = time.perf_counter()
    for _ in range(args.loader_batches):
        images, _texts = next(batches)
    assert images.shape[-1] == dataset.transform.transforms[1].size[0]
    rate = args.loader_batches * args.loader_batch / (time.perf_counter() - started)
    del batches  # shuts its workers down
    return rate


def run_loader_bench(args: argparse.Namespace, tmp: Path) -> dict:
    photos = tmp / "photo_shards"
    write_photo_shards(photos, args.loader_batch * (args.loader_batches + 4), args.loader_image_px)
    counts = [int(w) for w in args.loader_workers.split(",")]
    mgpt4_rates: dict[int, list[float]] = {w: [] for w in counts}
    torch_rates: dict[int, list[float]] = {w: [] for w in counts}
    for _ in range(args.rounds):  # alternate, so a noisy neighbour on the CPU hits both loaders
        for workers in counts:
            mgpt4_rates[workers].append(bench_loader(photos, args, workers))
            torch_rates[workers].append(bench_torch_loader(photos, args, workers))
    return {"mgpt4": {str(w): max(r) for w, r in mgpt4_rates.items()},
            "torch_dataloader": {str(w): max(r) for w, r in torch_rates.items()},
            "mgpt4_rounds": {str(w): r for w, r in mgpt4_rates.items()},
            "torch_dataloader_rounds": {str(w): r for w, r in torch_rates.items()}}  # fmt: skip


def gpu_step_demand() -> list[tuple[str, float]]:
    """(device, samples/s per GPU) of the 7B stage-1 step from bench/gpu_check.py's saved results."""
    demand = []
    for path in sorted(RESULTS.glob("gpu_check_*.json")):
        data = json.loads(path.read_text())
        rates = [v["samples_per_s"] for k, v in data.items() if isinstance(v, dict) and v.get("stage") == 1]
        if rates and data.get("preset", "").startswith(("vicuna", "llama")):
            demand.append((f"{data.get('preset')} stage 1, {data.get('device')} ({path.name})", max(rates)))
    return demand


def run_training_bench(args: argparse.Namespace, tmp: Path, cli_workers: list[int]) -> dict:
    shards = tmp / "shards"
    write_shards(shards, args.images)
    cli_rates: dict[int, list[float]] = {w: [] for w in cli_workers}
    plain_rates, demand_rates, cli_rss, plain_rss = [], [], 0.0, 0.0
    for index in range(args.rounds):  # alternate, so a noisy neighbour on the CPU hits every side
        for workers in cli_workers:
            rate, rss = bench_cli(shards, tmp / f"cli_run{index}_w{workers}", args, workers)
            cli_rates[workers].append(rate)
            cli_rss = max(cli_rss, rss)
        plain_rate, demand, plain_rss = bench_plain(shards, tmp / f"plain_run{index}", args)
        plain_rates.append(plain_rate)
        demand_rates.append(demand)
    return {"cli_samples_per_s": {str(w): max(r) for w, r in cli_rates.items()},
            "cli_rounds": {str(w): r for w, r in cli_rates.items()}, "plain_samples_per_s": max(plain_rates),
            "plain_rounds": plain_rates, "step_demand_samples_per_s": max(demand_rates),
            "peak_rss_mib": {"cli": cli_rss, "plain": plain_rss}}  # fmt: skip


def print_training(result: dict, args: argparse.Namespace) -> None:
    print(f"micro stage 1, micro batch {args.micro_batch_size}, {args.steps} steps after {args.warmup} "
          f"warm-up, {torch.get_num_threads()} threads, fp32 on CPU")  # fmt: skip
    plain = result["plain_samples_per_s"]
    for workers, rate in result["cli_samples_per_s"].items():
        each = ", ".join(f"{r:.1f}" for r in result["cli_rounds"][workers])
        label = f"mgpt4 pretrain ({args.zero}, {workers} workers)"
        print(f"  {label:<36} {rate:8.1f} samples/s   (rounds: {each})")
    each = ", ".join(f"{r:.1f}" for r in result["plain_rounds"])
    print(f"  {'plain PyTorch AdamW loop':<36} {plain:8.1f} samples/s   (rounds: {each})")
    rss = result["peak_rss_mib"]
    print(f"  peak RSS: mgpt4 {rss['cli']:.0f} MiB, plain {rss['plain']:.0f} MiB")
    best = max(result["cli_samples_per_s"].values())
    verdict = "ok" if best / plain >= 0.9 else "BELOW TARGET"
    print(f"  ratio mgpt4 (best) / plain: {best / plain:.3f}  (target >= 0.9: {verdict})")


def print_loader(loader: dict, demands: list[tuple[str, float]], args: argparse.Namespace) -> None:
    print(
        f"stage-1 loader alone: {args.loader_image_px}-px JPEG shards → 224-px tensors, "
        f"batch {args.loader_batch}, {args.loader_prefetch} batches ahead, best of {args.rounds} rounds"
    )
    mgpt4, reference = loader["mgpt4"], loader["torch_dataloader"]
    in_process = mgpt4.get("0")
    columns = ("mgpt4", "torch DataLoader", "mgpt4/DataLoader", "mgpt4/in-process")
    print(f"  {'workers':>7}" + "".join(f"{c:>18}" for c in columns) + "   (samples/s)")
    for workers, rate in mgpt4.items():
        here = f"{rate / in_process:18.2f}" if in_process else f"{'-':>18}"
        print(f"  {workers:>7}{rate:18.1f}{reference[workers]:18.1f}{rate / reference[workers]:18.2f}{here}")
    for name, key in (("mgpt4", "mgpt4_rounds"), ("torch DataLoader", "torch_dataloader_rounds")):
        rounds = "; ".join(f"{w}: " + ", ".join(f"{r:.0f}" for r in each) for w, each in loader[key].items())
        print(f"  rounds, {name} by workers: {rounds}")
    best = max(mgpt4.values())
    for label, demand in demands:
        print(f"  step demand: {demand:8.1f} samples/s — {label}; best loader / demand = {best / demand:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="measured steps on each side")
    parser.add_argument("--warmup", type=int, default=5, help="steps left out at the start")
    parser.add_argument("--micro-batch-size", type=int, default=32, help="the micro_stage1 recipe's 32")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads in both loops")
    parser.add_argument("--images", type=int, default=1024, help="synthetic images in the shards")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds; the best of each counts")
    parser.add_argument("--zero", default="zero2", help="train.zero of the mgpt4 side (micro_stage1: zero2)")
    parser.add_argument("--cli-workers", default="0", help="data.num_workers values of the mgpt4 side")
    parser.add_argument("--loader-only", action="store_true", help="measure the loader only, no training")
    parser.add_argument("--loader-workers", default="0,2,4", help="data.num_workers values of the loader")
    parser.add_argument("--loader-batch", type=int, default=64, help="loader micro batch (official 64)")
    parser.add_argument("--loader-batches", type=int, default=15, help="measured loader batches")
    parser.add_argument("--loader-prefetch", type=int, default=2, help="data.prefetch of the loader")
    parser.add_argument("--loader-image-px", type=int, default=224, help="JPEG size in the loader's shards")
    parser.add_argument("--out", default=None, help="also write the results as JSON to this file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    load_before = os.getloadavg()[0]
    result: dict = {"machine": platform.machine(), "cpus": os.cpu_count(), "cuda": torch.cuda.is_available(),
                    "torch_threads": torch.get_num_threads(), "args": vars(args)}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="mgpt4-bench-train-") as tmp:
        if not args.loader_only:
            cli_workers = [int(w) for w in args.cli_workers.split(",")]
            result["training"] = run_training_bench(args, Path(tmp), cli_workers)
            demand = result["training"]["step_demand_samples_per_s"]
        result["loader_samples_per_s"] = run_loader_bench(args, Path(tmp))
    demands = gpu_step_demand()
    if not args.loader_only:
        demands.insert(0, (f"micro stage 1 step here (fp32 CPU, batch {args.micro_batch_size})", demand))
    result["step_demand"] = [{"what": label, "samples_per_s": rate} for label, rate in demands]
    result["load_average_1m_before_after"] = [load_before, os.getloadavg()[0]]

    if not args.loader_only:
        print_training(result["training"], args)
    print_loader(result["loader_samples_per_s"], demands, args)
    load_after = os.getloadavg()[0]
    print(
        f"load average (1 min) before/after: {load_before:.1f} / {load_after:.1f} on {os.cpu_count()} cores"
    )
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
