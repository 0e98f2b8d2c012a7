"""The ``mgpt4`` command line: parse → build the config → call a library function → exit code.

Each command is a thin shell. Library code never prints to stdout for scripts or calls ``sys.exit``;
it returns data or raises an ``Mgpt4Error``, which ``main`` turns into one line on stderr and exit
code 2 (usage / bad input) or 1 (runtime failure). ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import json
import traceback
from collections.abc import Callable
from typing import Any

import click

from mgpt4 import __version__
from mgpt4.console import console, err_console
from mgpt4.errors import Mgpt4Error, UsageError

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 110}


class _Mgpt4Group(click.Group):
    """Maps ``Mgpt4Error`` to a one-line message and its exit code, for ``main`` and CliRunner alike."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except Mgpt4Error as exc:
            if ctx.params.get("debug"):
                traceback.print_exc()
            err_console.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            err_console.print("interrupted", highlight=False)
            ctx.exit(130)


def _config_options(fn: Callable) -> Callable:
    """``--config recipe.yaml`` plus trailing ``key.sub=value`` overrides."""
    fn = click.argument("overrides", nargs=-1, metavar="[KEY=VALUE]...")(fn)
    return click.option(
        "--config", "-c", "config_path", default=None, metavar="RECIPE",
        help="recipe YAML (a path, or a built-in name from `mgpt4 recipes`)",
    )(fn)


def _not_available(name: str, issue: int) -> None:
    raise UsageError(f"`mgpt4 {name}` is not available yet in this build (tracked in issue {issue})")


@click.group(cls=_Mgpt4Group, context_settings=CONTEXT_SETTINGS)
@click.version_option(__version__, "--version", prog_name="mgpt4")
@click.option("--debug", is_flag=True, help="show full tracebacks on errors")
def cli(debug: bool) -> None:
    """mgpt4 — train, curate and run MiniGPT-4-style vision-language models.

    Exit codes: 0 ok, 1 runtime failure, 2 usage or bad input.
    """
    del debug  # read by _Mgpt4Group.invoke from ctx.params


# --------------------------------------------------------------------------------------------------
# recipes
# --------------------------------------------------------------------------------------------------


@cli.group(invoke_without_command=True)
@click.pass_context
def recipes(ctx: click.Context) -> None:
    """List built-in recipes (`mgpt4 recipes show NAME` prints one)."""
    if ctx.invoked_subcommand is None:
        from mgpt4.config import builtin_recipes

        for name, path in sorted(builtin_recipes().items()):
            first = path.read_text().splitlines()[0] if path.suffix == ".yaml" else "DeepSpeed config"
            click.echo(f"{name:<20} {first.lstrip('# ').strip()}")


@recipes.command("show")
@click.argument("name")
def recipes_show(name: str) -> None:
    """Print a built-in recipe."""
    from mgpt4.config import resolve_recipe_path

    click.echo(resolve_recipe_path(name).read_text(), nl=False)


# --------------------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------------------


@cli.group()
def model() -> None:
    """Inspect model presets."""


@model.command("info")
@click.argument("preset")
@click.option("--trainable", default="proj", show_default=True, help="comma list: proj,qformer,vision,llm")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def model_info(preset: str, trainable: str, as_json: bool) -> None:
    """Parameter counts per module, trainable vs frozen, estimated memory (nothing is allocated)."""
    from mgpt4.model.info import model_summary, render_summary

    summary = model_summary(preset, [t.strip() for t in trainable.split(",") if t.strip()])
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        render_summary(summary, console)


# --------------------------------------------------------------------------------------------------
# lifecycle commands
# --------------------------------------------------------------------------------------------------


@cli.command(context_settings={"ignore_unknown_options": True})
@_config_options
def download(config_path: str | None, overrides: tuple[str, ...]) -> None:
    """URL lists → img2dataset-compatible WebDataset shards."""
    _not_available("download", 4)


@cli.command(context_settings={"ignore_unknown_options": True})
@_config_options
def pretrain(config_path: str | None, overrides: tuple[str, ...]) -> None:
    """Stage 1: align the projection on image-caption shards."""
    _not_available("pretrain", 5)


@cli.command(context_settings={"ignore_unknown_options": True})
@_config_options
def finetune(config_path: str | None, overrides: tuple[str, ...]) -> None:
    """Stage 2: finetune on the aligned set with the chat template."""
    _not_available("finetune", 5)


@cli.command(context_settings={"ignore_unknown_options": True})
@_config_options
def curate(config_path: str | None, overrides: tuple[str, ...]) -> None:
    """Build the aligned set: describe → Continue → LLM fix → filters → review."""
    _not_available("curate", 6)


@cli.command(context_settings={"ignore_unknown_options": True})
@_config_options
def describe(config_path: str | None, overrides: tuple[str, ...]) -> None:
    """Describe images, folders, globs or shards (batched; --json for JSONL)."""
    _not_available("describe", 7)


@cli.command(context_settings={"ignore_unknown_options": True})
@_config_options
def chat(config_path: str | None, overrides: tuple[str, ...]) -> None:
    """Multi-turn chat about an image in the terminal (pipe stdin for scripts)."""
    _not_available("chat", 7)


@cli.command(context_settings={"ignore_unknown_options": True})
@_config_options
def demo(config_path: str | None, overrides: tuple[str, ...]) -> None:
    """The whole lifecycle on the built-in shapes data set, on CPU, with a measured score."""
    _not_available("demo", 8)


# --------------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    cli.main(args=argv, prog_name="mgpt4")
