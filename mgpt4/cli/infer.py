"""``mgpt4 describe`` and ``mgpt4 chat``: options, describe's output (panels, plain text, JSONL).

The chat loop itself (a terminal or piped stdin) is ``mgpt4.cli.chat``.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable

import click
from rich.panel import Panel
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text

from mgpt4.cli.console import console, err_console, setup_logging, warn
from mgpt4.cli.options import Flag, config_option, config_overrides, options_from, split_args
from mgpt4.errors import DataError, UsageError
from mgpt4.infer.config import ChatConfig, DescribeConfig

log = logging.getLogger("mgpt4.infer")

# The model options of describe and chat (and eval, serve): -m picks a saved folder or a preset; with a
# preset, the official files.
MODEL_FLAGS = (
    Flag("model.vision_weights", "--vision", metavar="PTH"),
    Flag("model.qformer_weights", "--qformer", metavar="PTH"),
    Flag("model.proj_weights", "--proj", metavar="PTH"),
    Flag("model.llm_path", "--llm", metavar="DIR"),
    "device",
    "model.dtype",
    "model.quantize",
)
DECODING_FLAGS = (
    "generate.max_new_tokens", "generate.num_beams", "generate.temperature", "generate.top_p",
    "generate.repetition_penalty", "generate.seed",
)  # fmt: skip


def model_option(fn: Callable) -> Callable:
    """``-m/--model RUN_OR_PRESET``: a run directory, checkpoints/step-N, or a preset name."""
    return click.option(
        "--model",
        "-m",
        "model_source",
        metavar="RUN_OR_PRESET",
        help="model folder, run directory, checkpoints/step-N, or a preset (micro, vicuna-7b, …); "
        "default: $MGPT4_MODEL, else `mgpt4 config set model`  [sets checkpoint, or model.preset]",
    )(fn)


def model_overrides(model_source: str | None, config_path: str | None, key_values: list[str]) -> list[str]:
    """``--model`` as a ``checkpoint=`` or ``model.preset=`` override (a flag: highest precedence).

    Without ``--model``, a recipe or ``KEY=VALUE`` naming ``checkpoint`` or ``model.preset`` decides;
    when nothing names a model, the default model (``$MGPT4_MODEL``, else the user config's ``model:``).

    Raises:
        UsageError: not a folder or preset; no model anywhere (says how to set a default).
    """
    if model_source is None:
        if _names_a_model(config_path, key_values):
            return []
        from mgpt4.user_config import default_model

        model_source = default_model()
    from mgpt4.infer.loading import split_model_source

    checkpoint, preset = split_model_source(model_source)
    return [f"checkpoint={json.dumps(checkpoint)}"] if checkpoint else [f"model.preset={preset}"]


def _names_a_model(config_path: str | None, key_values: list[str]) -> bool:
    keys = {item.partition("=")[0].strip() for item in key_values}
    if keys & {"checkpoint", "model", "model.preset"}:
        return True
    if config_path is None:
        return False
    from mgpt4.config import read_recipe

    recipe = read_recipe(config_path)
    model = recipe.get("model")
    return recipe.get("checkpoint") is not None or (isinstance(model, dict) and "preset" in model)


# --------------------------------------------------------------------------------------------------
# describe
# --------------------------------------------------------------------------------------------------


@click.command()
@click.argument("args", nargs=-1, metavar="IMG|DIR|GLOB|SHARDS... [KEY=VALUE]...")
@config_option
@model_option
@options_from(DescribeConfig, *MODEL_FLAGS, *DECODING_FLAGS)
@options_from(
    DescribeConfig, Flag("prompt", "-p"), Flag("generate.do_sample", "--sample"), Flag("batch_size", "-b"),
    "json", Flag("output", "-o", metavar="FILE"), Flag("quiet", "-q"),
)  # fmt: skip
@click.pass_context
def describe(
    ctx: click.Context, args: tuple[str, ...], config_path: str | None, model_source: str | None
) -> None:
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
    from mgpt4.infer.describe import collect_inputs, count_images, run_describe

    inputs, key_values = split_args(args)
    overrides = config_overrides(ctx, key_values) + ([f"inputs={json.dumps(inputs)}"] if inputs else [])
    overrides += model_overrides(model_source, config_path, key_values)
    cfg = load_config(DescribeConfig, config_path, overrides)
    setup_logging(cfg.quiet)  # logs go to stderr: --json keeps stdout clean either way
    view = DescribeView(cfg, count_images(collect_inputs(cfg.inputs)))
    with view:
        summary = run_describe(cfg, view)
    if summary.failed:
        raise DataError(
            f"{summary.failed} of {len(summary.results)} input(s) could not be read (listed above); "
            f"{summary.described} described"
        )


class DescribeView:
    """Shows describe results as they arrive: rich panels, plain blocks or JSONL on stdout.

    The progress bar shares the stdout console when stdout is a terminal (panels and bar then never
    fight over the same screen), and uses stderr otherwise so that piped stdout stays clean.
    """

    def __init__(self, cfg: DescribeConfig, total: int | None) -> None:
        self.cfg = cfg
        self.total = total
        self._progress: Progress | None = None
        self._task = None

    def __enter__(self) -> DescribeView:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def _bar(self) -> Progress | None:
        bar_console = console if console.is_terminal and not self.cfg.json else err_console
        if self._progress is None and not self.cfg.quiet and bar_console.is_terminal:
            self._progress = Progress(
                SpinnerColumn(), TextColumn("describing"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), console=bar_console, transient=True, redirect_stdout=False,
                redirect_stderr=False,
            )  # fmt: skip
            self._progress.start()
            self._task = self._progress.add_task("describe", total=self.total)
        return self._progress

    def __call__(self, result, done: int, total: int | None) -> None:
        """Show one result (or report its failure on stderr) and advance the progress bar."""
        bar = self._bar()
        if bar is not None:
            bar.advance(self._task)
        elif done % self.cfg.batch_size == 0 or done == total:
            log.info("described %d/%s", done, total or "?")  # plain progress when not on a TTY
        if result.error:
            message = f"skipped {result.image}: {result.error}"
            if bar is not None and bar.console is err_console:
                bar.console.print(message, markup=False, highlight=False, soft_wrap=True)
            else:
                warn(message)
            return
        if self.cfg.json:
            sys.stdout.write(json.dumps(result.to_json(), ensure_ascii=False) + "\n")
            sys.stdout.flush()
        elif self.cfg.output is None or not self.cfg.quiet:
            self._print_text(result)

    def _print_text(self, result) -> None:
        if console.is_terminal:
            subtitle = f"{result.tokens} tokens · {result.seconds:.2f} s"
            panel = Panel(
                Text(result.text or "(empty answer)"), title=Text(result.image), title_align="left",
                subtitle=subtitle, subtitle_align="right", border_style="cyan",
            )  # fmt: skip
            (self._progress.console if self._progress is not None else console).print(panel)
        elif self.total == 1:
            sys.stdout.write(result.text + "\n")
        else:
            sys.stdout.write(f"==> {result.image} <==\n{result.text}\n\n")
        sys.stdout.flush()


# --------------------------------------------------------------------------------------------------
# chat
# --------------------------------------------------------------------------------------------------


@click.command()
@click.argument("args", nargs=-1, metavar="[IMG] [KEY=VALUE]...")
@config_option
@model_option
@options_from(ChatConfig, *MODEL_FLAGS, *DECODING_FLAGS)
@options_from(
    ChatConfig, Flag("generate.do_sample", "--greedy"), Flag("load", metavar="FILE"), Flag("stream"), "json"
)
@click.pass_context
def chat(
    ctx: click.Context, args: tuple[str, ...], config_path: str | None, model_source: str | None
) -> None:
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
    from mgpt4.cli.chat import run_chat
    from mgpt4.config import load_config

    images, key_values = split_args(args)
    if len(images) > 1:
        raise UsageError(f"chat takes one image (got {len(images)}); switch images with /image PATH")
    overrides = config_overrides(ctx, key_values) + ([f"image={json.dumps(images[0])}"] if images else [])
    overrides += model_overrides(model_source, config_path, key_values)
    run_chat(load_config(ChatConfig, config_path, overrides))
