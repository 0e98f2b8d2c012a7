"""Benchmark `mgpt4 eval` against `describe`: does answering through eval cost generation time?

    python bench/eval.py                                  # micro + the ~200 M random "bench-small" preset
    python bench/eval.py --presets micro --images 32 --batch-size 8 --out bench/results/eval_cpu.json

Both sides get the same model (random weights, built in memory), the same image files, the same
prompt ("Describe this image in detail." in the stage-2 template), the same decoding and batch size:

- describe: ``describe_images`` over the image folder (what `mgpt4 describe` runs);
- eval: ``run_eval`` of the ``captions`` task over a COCO-style captions file listing the same images —
  everything eval adds is inside the timing: reading the data, per-item prompts, fsync'd journal
  appends per batch, scoring (BLEU, CIDEr-D, ROUGE-L; METEOR off, it is a separate JVM), the atomic
  rewrite of answers.jsonl, scores.json and report.html. Each eval repeat starts from an empty folder.

It checks that both produce the same answers, then prints answers/s for each and the ratio eval /
describe (target ≥ 0.95: scoring must not cost generation time), for the whole ``run_eval`` and for
its answering loop alone (``EvalResult.answers_per_s``: prompts, generation, journal appends — scoring
and the output files excluded). The order alternates per repeat.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from infer import BENCH_SMALL, make_images  # noqa: E402 - the sibling benchmark's preset and images

from mgpt4.config import GenerateConfig, ModelConfig  # noqa: E402
from mgpt4.eval.config import EvalConfig  # noqa: E402
from mgpt4.eval.pipeline import run_eval  # noqa: E402
from mgpt4.infer.describe import DescribeConfig, collect_inputs, describe_images  # noqa: E402
from mgpt4.infer.loading import load_model, resolve_device  # noqa: E402
from mgpt4.model.presets import PRESETS  # noqa: E402


def write_captions_file(folder: Path, images: list[str], name: str = "captions.json") -> Path:
    """A COCO-style captions JSON over ``images`` with two placeholder references each."""
    data = {
        "images": [{"id": i, "file_name": Path(p).name} for i, p in enumerate(images)],
        "annotations": [
            {"image_id": i, "caption": caption}
            for i in range(len(images))
            for caption in ("a picture of random coloured noise", "colourful static")
        ],
    }
    path = folder / name
    path.write_text(json.dumps(data))
    return path


def timed_describe(
    model, images: list[str], batch_size: int, config: GenerateConfig
) -> tuple[float, list[str]]:
    cfg = DescribeConfig(inputs=images, batch_size=batch_size, generate=config)
    start = time.perf_counter()
    results = list(describe_images(model, cfg, images))
    return time.perf_counter() - start, [r.text for r in results]


def timed_eval(
    model, data: Path, out: Path, batch_size: int, config: GenerateConfig
) -> tuple[float, list[str], float]:
    """Seconds of the whole ``run_eval``, its answers, and the seconds of its answering loop alone."""
    cfg = EvalConfig(
        task="captions", data=str(data), out=str(out), batch_size=batch_size, generate=config, meteor=False
    )
    start = time.perf_counter()
    result = run_eval(cfg, model=model)
    seconds = time.perf_counter() - start
    answers = [json.loads(line)["answer"] for line in (out / "answers.jsonl").read_text().splitlines()]
    return seconds, answers, result.answered_now / result.answers_per_s


def bench_preset(name: str, args: argparse.Namespace, folder: Path) -> dict:
    model = load_model(ModelConfig(preset=name, dtype=args.dtype), None, args.device)
    images = collect_inputs([str(folder / "images")])[: args.images]
    data = write_captions_file(folder / "images", images)
    config = GenerateConfig(max_new_tokens=args.max_new_tokens)
    # Warm-up: first calls pay one-time costs (allocator, imports of the scorers), not throughput.
    timed_describe(model, images[:2], 2, GenerateConfig(max_new_tokens=4))
    timed_eval(
        model,
        write_captions_file(folder / "images", images[:2], "warm.json"),
        folder / f"warm-{name}",
        2,
        GenerateConfig(max_new_tokens=4),
    )
    describe_runs, eval_runs = [], []
    for repeat in range(args.repeats):
        out = folder / f"eval-{name}-{repeat}"
        if repeat % 2 == 0:
            describe_runs.append(timed_describe(model, images, args.batch_size, config))
            eval_runs.append(timed_eval(model, data, out, args.batch_size, config))
        else:
            eval_runs.append(timed_eval(model, data, out, args.batch_size, config))
            describe_runs.append(timed_describe(model, images, args.batch_size, config))
    same = all(d[1] == e[1] for d, e in zip(describe_runs, eval_runs, strict=True))
    describe_s = statistics.median(s for s, _ in describe_runs)
    eval_s = statistics.median(run[0] for run in eval_runs)
    answering_s = statistics.median(run[2] for run in eval_runs)
    return {
        "preset": name,
        "device": str(model.device),
        "images": len(images),
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "same_answers": same,
        "describe_answers_per_s": len(images) / describe_s,
        "eval_answers_per_s": len(images) / eval_s,
        "ratio": describe_s / eval_s,
        "eval_answering_answers_per_s": len(images) / answering_s,
        "answering_ratio": describe_s / answering_s,
        "describe_seconds": [round(s, 4) for s, _ in describe_runs],
        "eval_seconds": [round(run[0], 4) for run in eval_runs],
        "eval_answering_seconds": [round(run[2], 4) for run in eval_runs],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--presets", default="micro,bench-small", help="comma list (bench-small: ~200 M random)"
    )
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5, help="median of this many runs of each")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--out", default=None, help="also write the results as JSON to this file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    PRESETS.setdefault(BENCH_SMALL.name, BENCH_SMALL)
    device = resolve_device(args.device)
    print(
        f"device {device} · torch threads {torch.get_num_threads()} · {args.images} images · batch "
        f"{args.batch_size} · max_new_tokens {args.max_new_tokens} · median of {args.repeats}"
    )
    print(f"{'preset':<12} {'same answers':>12} {'describe ans/s':>15} {'eval ans/s':>11} {'ratio':>6} "
          f"{'answering/s':>14} {'ratio':>6}")  # fmt: skip
    rows = []
    load_before = os.getloadavg()[0]  # other work on the machine skews both sides: record how busy it was
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "images").mkdir()
        make_images(Path(tmp) / "images", args.images)
        for name in args.presets.split(","):
            row = bench_preset(name.strip(), args, Path(tmp))
            rows.append(row)
            print(_line(row), flush=True)
    print("eval ans/s: the whole run_eval (load data, answer, score, write outputs); answering/s: its")
    print(
        "answering loop alone (prompts, generation, journal appends). target: ratio (eval ÷ describe) >= 0.95"
    )
    if args.out:
        result = {
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
            "cpus": _cpus(),
            "torch_threads": torch.get_num_threads(),
            "load_average_1m_before_after": [load_before, os.getloadavg()[0]],
            "args": vars(args),
            "rows": rows,
        }
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


def _line(row: dict) -> str:
    return (
        f"{row['preset']:<12} {str(row['same_answers']):>12} {row['describe_answers_per_s']:>15.2f} "
        f"{row['eval_answers_per_s']:>11.2f} {row['ratio']:>6.3f} "
        f"{row['eval_answering_answers_per_s']:>14.2f} {row['answering_ratio']:>6.3f}"
    )


def _cpus() -> int | None:
    return os.cpu_count()


if __name__ == "__main__":
    main()
