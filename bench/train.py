"""Benchmark `mgpt4 pretrain` (micro stage 1) against a minimal plain PyTorch loop on the same batches.

    python bench/train.py                         # 5 warm-up + 30 measured steps, micro batch 32
    python bench/train.py --steps 60 --threads 1  # one intra-op thread in both loops
    python bench/train.py --zero zero1            # another ZeRO recipe on the mgpt4 side

Both sides train the micro preset from the ``micro_stage1`` recipe on the same synthetic shards:

  (a) ``mgpt4 pretrain`` in a subprocess — the real CLI path (DeepSpeed ZeRO-2, fp32, the shard mixture,
      per-step metrics, a checkpoint at the end); samples/s from its ``metrics.jsonl``, warm-up steps
      left out, checkpoint time not counted (it happens after the last step's timing);
  (b) in this process: ``build_model`` with the same model config, ``torch.optim.AdamW`` with the same
      hyper-parameters and gradient clipping, batches from ``mgpt4.train.data.make_batches``.

Each step is timed from fetching the batch to the end of the optimizer step on both sides. The sides
alternate for ``--rounds`` rounds and the best rate of each counts (a shared CPU is noisy). It prints
samples/s of each, their ratio (target ≥ 0.9) and the peak RSS of each process.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import webdataset as wds

from mgpt4.config import load_config
from mgpt4.data.synthetic import make_samples
from mgpt4.model.build import build_model
from mgpt4.train.config import TrainRunConfig
from mgpt4.train.data import make_batches


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


def overrides(shards: Path, run: Path, args: argparse.Namespace) -> list[str]:
    total = args.warmup + args.steps
    return [
        f"data.shards=[{{path: {shards}}}]", f"out={run}", f"data.micro_batch_size={args.micro_batch_size}",
        f"train.max_steps={total}", "train.log_every=1", f"train.save_every={total}", "train.plot=false",
        f"train.zero={args.zero}",
    ]  # fmt: skip


def rss_mib(kib: int) -> float:
    return kib / 1024  # Linux reports ru_maxrss in KiB


def bench_cli(shards: Path, run: Path, args: argparse.Namespace) -> tuple[float, float]:
    """samples/s of ``mgpt4 pretrain`` after warm-up, and the peak RSS (MiB) of its process."""
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    command = [str(Path(sys.executable).with_name("mgpt4")), "pretrain", "--config", "micro_stage1", "-q",
               *overrides(shards, run, args)]  # fmt: skip
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
    peak = rss_mib(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)  # the only child so far
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    measured = [m for m in lines if m["step"] > args.warmup]
    seconds = sum(args.micro_batch_size / m["samples_per_s"] for m in measured)
    return len(measured) * args.micro_batch_size / seconds, peak


def bench_plain(shards: Path, run: Path, args: argparse.Namespace) -> tuple[float, float]:
    """samples/s of a plain AdamW loop on the same model and batches, and this process's peak RSS."""
    cfg = load_config(TrainRunConfig, "micro_stage1", overrides(shards, run, args))
    torch.manual_seed(cfg.train.seed)
    model = build_model(dataclasses.replace(cfg.model, dtype="fp32"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2),
                                  weight_decay=cfg.optim.weight_decay)  # fmt: skip
    batches = make_batches(cfg, model.preset, rank=0, world_size=1)
    seconds, samples = 0.0, 0
    for step in range(args.warmup + args.steps):
        started = time.perf_counter()
        batch = batches.next_batch()
        loss = model(batch)
        loss.backward()
        if cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= args.warmup:
            seconds += time.perf_counter() - started
            samples += len(batch["text"])
    return samples / seconds, rss_mib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="measured steps on each side")
    parser.add_argument("--warmup", type=int, default=5, help="steps left out at the start")
    parser.add_argument("--micro-batch-size", type=int, default=32, help="the micro_stage1 recipe's 32")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads in both loops")
    parser.add_argument("--images", type=int, default=1024, help="synthetic images in the shards")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds; the best of each counts")
    parser.add_argument("--zero", default="zero2", help="train.zero of the mgpt4 side (micro_stage1: zero2)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    cli_rates, plain_rates = [], []
    with tempfile.TemporaryDirectory(prefix="mgpt4-bench-train-") as tmp:
        shards = Path(tmp) / "shards"
        write_shards(shards, args.images)
        for index in range(args.rounds):  # alternate, so a noisy neighbour on the CPU hits both sides
            cli_rate, cli_rss = bench_cli(shards, Path(tmp) / f"cli_run{index}", args)
            plain_rate, plain_rss = bench_plain(shards, Path(tmp) / f"plain_run{index}", args)
            cli_rates.append(cli_rate)
            plain_rates.append(plain_rate)
    cli_rate, plain_rate = max(cli_rates), max(plain_rates)

    print(f"micro stage 1, micro batch {args.micro_batch_size}, {args.steps} steps after {args.warmup} "
          f"warm-up, {torch.get_num_threads()} threads, fp32 on CPU")  # fmt: skip
    for label, rate, rss, rates in (
        (f"mgpt4 pretrain ({args.zero})", cli_rate, cli_rss, cli_rates),
        ("plain PyTorch AdamW loop", plain_rate, plain_rss, plain_rates),
    ):
        each = ", ".join(f"{r:.1f}" for r in rates)
        print(f"  {label:<28} {rate:8.1f} samples/s   peak RSS {rss:6.0f} MiB   (rounds: {each})")
    verdict = "ok" if cli_rate / plain_rate >= 0.9 else "BELOW TARGET"
    print(f"  ratio mgpt4 / plain: {cli_rate / plain_rate:.3f}  (target >= 0.9: {verdict})")


if __name__ == "__main__":
    main()
