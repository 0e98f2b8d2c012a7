"""Benchmark `mgpt4 describe`: decoding overhead vs plain HF generate, and batching speed-up.

    python bench/infer.py                      # micro + the larger random "bench-small" preset
    python bench/infer.py --presets micro --images 16 --max-new-tokens 64 --device cuda

For each preset (random weights, built in memory) it prints:
  (a) tokens/s of the describe path (``describe_images``: image files → transform → ViT/Q-Former →
      prompt embedding → batched generate with per-row ``###`` stop → cleaned text), against a plain
      ``LlamaForCausalLM.generate`` call on the same ``inputs_embeds`` producing the same number of
      tokens per image — both one image at a time. Target ratio ≥ 0.95.
  (b) images/s of describe at ``--batch-size 8`` vs 1. Target ≥ 3×.

The process start and model loading of the CLI are left out (they do not scale with the inputs).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mgpt4.config import GenerateConfig, ModelConfig
from mgpt4.infer.describe import DescribeConfig, build_prompt, collect_inputs, describe_images
from mgpt4.infer.loading import load_model, resolve_device
from mgpt4.model.presets import PRESETS, LLMSpec, Preset, QFormerSpec, VisionSpec
from mgpt4.model.vision import image_transform

# A random preset between micro and 7B that fits in a few GB of RAM: ~30 M ViT, ~170 M LLM.
BENCH_SMALL = Preset(
    name="bench-small",
    description="benchmark only: EVA-style ViT-S at 224 px, 2-layer Q-Former, 12-layer 1024-wide Llama",
    vision=VisionSpec(image_size=224, patch_size=14, width=384, depth=6, num_heads=6, mlp_dim=1536),
    qformer=QFormerSpec(
        hidden_size=768, num_layers=2, num_heads=12, intermediate_size=3072, num_query_tokens=32
    ),
    llm=LLMSpec(1024, 12, 16, 2816, 32000, 2048, 1e-6),
)


def make_images(folder: Path, count: int) -> None:
    """Noise images (varied content, so rows of a batch differ)."""
    rng = np.random.default_rng(0)
    for index in range(count):
        pixels = rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{index:03d}.png")


def timed_describe(model, inputs, batch_size: int, config: GenerateConfig) -> tuple[float, list]:
    cfg = DescribeConfig(inputs=inputs, batch_size=batch_size, generate=config)
    start = time.perf_counter()
    results = list(describe_images(model, cfg, inputs))
    seconds = time.perf_counter() - start
    assert not any(r.error for r in results), [r.error for r in results if r.error]
    return seconds, results


@torch.no_grad()
def timed_plain_generate(model, inputs, token_counts: list[int]) -> float:
    """Plain HF generate on precomputed embeddings (not timed), ``token_counts[i]`` new tokens each."""
    transform = image_transform(model.preset.vision.image_size)
    prompt = build_prompt(None, model.preset.stage2_template)
    embeds = []
    for path in inputs:
        with Image.open(path) as image:
            pixels = transform(image)[None]
        embeds.append(model.embed_prompt(prompt, model.encode_images(pixels))[None])
    llm = model.llama_model
    start = time.perf_counter()
    for row, count in zip(embeds, token_counts, strict=True):
        out = llm.generate(
            inputs_embeds=row,
            attention_mask=torch.ones(row.shape[:2], dtype=torch.long, device=row.device),
            max_new_tokens=count,
            min_new_tokens=count,
            do_sample=False,
            pad_token_id=model.tokenizer.pad_token_id,
        )
        assert out.shape[-1] == count, (out.shape, count)
    _sync(model.device)
    return time.perf_counter() - start


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_preset(name: str, args: argparse.Namespace, folder: Path) -> dict:
    model = load_model(ModelConfig(preset=name, dtype=args.dtype), None, args.device)
    inputs = collect_inputs([str(folder)])[: args.images]
    # repetition_penalty 1.0: the plain baseline has no logits processor either.
    config = GenerateConfig(max_new_tokens=args.max_new_tokens, repetition_penalty=1.0)
    timed_describe(model, inputs[:2], 1, dataclasses.replace(config, max_new_tokens=4))  # warm-up
    single_runs, batch_runs, plain_runs = [], [], []
    for _ in range(args.repeats):
        seconds, results = timed_describe(model, inputs, 1, config)
        single_runs.append((seconds, results))
        # Same inputs and token counts; +len(stop) tokens the describe rows spent on "###" are not
        # counted for describe, so the comparison slightly favours the baseline.
        plain_runs.append(timed_plain_generate(model, inputs, [max(r.tokens, 1) for r in results]))
        batch_runs.append(timed_describe(model, inputs, 8, config)[0])
    single_seconds = statistics.median(s for s, _ in single_runs)
    tokens = sum(r.tokens for r in single_runs[0][1])
    plain_seconds = statistics.median(plain_runs)
    batch_seconds = statistics.median(batch_runs)
    return {
        "preset": name,
        "device": str(model.device),
        "dtype": str(model.llama_proj.weight.dtype).removeprefix("torch."),
        "images": len(inputs),
        "tokens": tokens,
        "describe_tok_s": tokens / single_seconds,
        "plain_tok_s": tokens / plain_seconds,
        "ratio": plain_seconds / single_seconds,
        "img_s_b1": len(inputs) / single_seconds,
        "img_s_b8": len(inputs) / batch_seconds,
        "speedup": single_seconds / batch_seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--presets", default="micro,bench-small", help="comma list (bench-small: ~200 M random)"
    )
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3, help="median of this many runs")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    PRESETS.setdefault(BENCH_SMALL.name, BENCH_SMALL)
    device = resolve_device(args.device)
    print(
        f"device {device} · torch threads {torch.get_num_threads()} · {args.images} images · "
        f"max_new_tokens {args.max_new_tokens} · median of {args.repeats}"
    )
    header = (
        f"{'preset':<12} {'dtype':<9} {'tokens':>6} {'describe tok/s':>15} {'plain tok/s':>12} "
        f"{'ratio':>6}  {'img/s b1':>9} {'img/s b8':>9} {'b8/b1':>6}"
    )
    print(header)
    with tempfile.TemporaryDirectory() as tmp:
        make_images(Path(tmp), args.images)
        for name in args.presets.split(","):
            row = bench_preset(name.strip(), args, Path(tmp))
            print(
                f"{row['preset']:<12} {row['dtype']:<9} {row['tokens']:>6} {row['describe_tok_s']:>15.1f} "
                f"{row['plain_tok_s']:>12.1f} {row['ratio']:>6.3f}  {row['img_s_b1']:>9.2f} "
                f"{row['img_s_b8']:>9.2f} {row['speedup']:>5.2f}x",
                flush=True,
            )
    print("targets: ratio >= 0.95 (describe vs plain generate), b8/b1 >= 3x")


if __name__ == "__main__":
    main()
