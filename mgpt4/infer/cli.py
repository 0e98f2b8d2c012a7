"""``mgpt4 describe`` and ``mgpt4 chat``: thin click shells over ``mgpt4.infer.commands``."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import click

from mgpt4.cli_options import as_overrides, split_args
from mgpt4.errors import UsageError


def model_options(fn: Callable) -> Callable:
    """``--model RUN_OR_PRESET`` plus official weight paths, device and dtype (describe, chat)."""
    options = [
        click.option(
            "--model",
            "-m",
            "model_source",
            metavar="RUN_OR_PRESET",
            help="run directory, checkpoints/step-N, or a preset (micro, vicuna-7b, …)",
        ),
        click.option("--vision", metavar="PTH", help="with a preset: LAVIS eva_vit_g.pth"),
        click.option("--qformer", metavar="PTH", help="with a preset: BLIP-2 blip2_pretrained_flant5xxl.pth"),
        click.option("--proj", metavar="PTH", help="with a preset: pretrained_minigpt4*.pth or .safetensors"),
        click.option("--llm", metavar="DIR", help="with a preset: local HF Vicuna / Llama-2-chat directory"),
        click.option("--device", help="auto (cuda when present, else cpu), cpu, cuda, cuda:N"),
        click.option(
            "--dtype",
            type=click.Choice(["auto", "fp32", "bf16", "fp16"]),
            help="auto: bf16 on CUDA, fp32 on CPU",
        ),
        click.option("--max-new-tokens", type=int, help="tokens per answer at most (official 300)"),
        click.option("--num-beams", type=int, help="beam search width (1 = off)"),
        click.option("--temperature", type=float, help="softmax temperature when sampling (official 1.0)"),
        click.option("--top-p", type=float, help="nucleus mass when sampling (official 0.9)"),
        click.option("--repetition-penalty", type=float, help="official demo 1.05"),
        click.option("--seed", type=int, help="random seed for sampling"),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def infer_overrides(flags: dict[str, Any], needs_model: bool) -> list[str]:
    """The given ``--model``/weights/decoding flags as ``key=value`` overrides (JSON values are YAML)."""
    keys = {"vision": "model.vision_weights", "qformer": "model.qformer_weights",
            "proj": "model.proj_weights", "llm": "model.llm_path", "dtype": "model.dtype",
            "device": "device"}  # fmt: skip
    for name in ("max_new_tokens", "num_beams", "temperature", "top_p", "repetition_penalty", "seed"):
        keys[name] = f"generate.{name}"
    overrides = as_overrides(flags, keys)
    source = flags.get("model_source")
    if source is not None:
        from mgpt4.infer.loading import split_model_source

        checkpoint, preset = split_model_source(source)
        overrides += [f"checkpoint={json.dumps(checkpoint)}"] if checkpoint else [f"model.preset={preset}"]
    elif needs_model:
        raise UsageError("--model: give a run directory, checkpoint folder or preset (or a --config recipe)")
    return overrides


@click.command()
@click.argument("args", nargs=-1, metavar="IMG|DIR|GLOB|SHARDS... [KEY=VALUE]...")
@click.option("--config", "-c", "config_path", metavar="RECIPE", help="recipe YAML (path or built-in name)")
@model_options
@click.option("--prompt", "-p", help="instruction (default: 'Describe this image in detail.')")
@click.option("--sample", is_flag=True, default=None, help="sample instead of greedy decoding")
@click.option("--batch-size", "-b", type=int, help="images per generate call (default 8)")
@click.option("--json", "as_json", is_flag=True, default=None, help="JSONL: image, prompt, text, tokens…")
@click.option("--output", "-o", metavar="FILE", help="also write the JSONL to FILE")
@click.option("--quiet", "-q", is_flag=True, default=None, help="no progress or info on stderr")
def describe(args: tuple[str, ...], config_path: str | None, **flags: Any) -> None:
    """Describe images, folders, globs or shards (batched; --json for JSONL).

    Greedy by default so scripts get stable output; unreadable images are reported and skipped
    (exit code 1). Plain text when piped, panels on a terminal, JSONL with --json.

    \b
    Examples:
      mgpt4 describe -m runs/stage2 cat.jpg photos/ 'more/**/*.png'
      mgpt4 describe -m runs/stage2 shards/ -b 16 --json -o captions.jsonl
      mgpt4 describe -m vicuna-7b --vision eva_vit_g.pth --qformer blip2_pretrained_flant5xxl.pth \\
          --proj pretrained_minigpt4_7b.pth --llm vicuna-7b/ cat.jpg --prompt "What is unusual here?"
    """
    from mgpt4.config import load_config
    from mgpt4.infer.commands import run_describe
    from mgpt4.infer.describe import DescribeConfig

    inputs, overrides = split_args(args)
    keys = {"prompt": "prompt", "sample": "generate.do_sample", "batch_size": "batch_size", "as_json": "json",
            "output": "output", "quiet": "quiet"}  # fmt: skip
    given = as_overrides(flags, keys) + ([f"inputs={json.dumps(inputs)}"] if inputs else [])
    given += infer_overrides(flags, needs_model=config_path is None)
    run_describe(load_config(DescribeConfig, config_path, given + overrides))


@click.command()
@click.argument("args", nargs=-1, metavar="[IMG] [KEY=VALUE]...")
@click.option("--config", "-c", "config_path", metavar="RECIPE", help="recipe YAML (path or built-in name)")
@model_options
@click.option("--greedy", is_flag=True, default=None, help="greedy decoding instead of the demo's sampling")
@click.option("--load", "load_path", metavar="FILE", help="resume a transcript saved with /save")
@click.option("--no-stream", is_flag=True, default=None, help="print each answer when it is complete")
@click.option("--json", "as_json", is_flag=True, default=None, help="one JSON line per answer (piped mode)")
def chat(args: tuple[str, ...], config_path: str | None, **flags: Any) -> None:
    """Multi-turn chat about an image in the terminal (pipe stdin for scripts).

    Official chat template and demo decoding (sampling, top_p 0.9, repetition_penalty 1.05).
    Commands: /image PATH, /reset, /save FILE, /set KEY VALUE, /help, /exit; Ctrl-C stops an
    answer. Lines piped to stdin are turns and the answers go to stdout (--json: one JSON line each).

    \b
    Examples:
      mgpt4 chat -m runs/stage2 cat.jpg
      printf 'what colour is it?\\nwhere is it?\\n' | mgpt4 chat -m runs/stage2 cat.jpg --greedy
      mgpt4 chat -m runs/stage2 --load chat.json
    """
    from mgpt4.config import load_config
    from mgpt4.infer.chat import ChatConfig
    from mgpt4.infer.commands import run_chat

    images, overrides = split_args(args)
    if len(images) > 1:
        raise UsageError(f"chat takes one image (got {len(images)}); switch images with /image PATH")
    flags["image"] = images[0] if images else None
    flags["greedy"] = False if flags["greedy"] else None  # do_sample = not greedy
    flags["no_stream"] = False if flags["no_stream"] else None
    keys = {"image": "image", "greedy": "generate.do_sample", "no_stream": "stream", "as_json": "json",
            "load_path": "load"}  # fmt: skip
    given = as_overrides(flags, keys)
    given += infer_overrides(flags, needs_model=config_path is None)
    run_chat(load_config(ChatConfig, config_path, given + overrides))
