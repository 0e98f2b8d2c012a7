"""``mgpt4 curate`` (describe → Continue → fix → filter → aligned set) and ``mgpt4 curate review``."""

from __future__ import annotations

import dataclasses
import json

import click
from rich.table import Table

from mgpt4.cli.console import console, progress_bar, setup_logging
from mgpt4.cli.options import (
    Flag,
    RunByDefaultGroup,
    config_option,
    config_overrides,
    options_from,
    output_options,
)
from mgpt4.curate.config import CurateConfig, ReviewConfig

EXISTING_FILE = click.Path(exists=True, dir_okay=False)


@click.group(cls=RunByDefaultGroup, context_settings={"ignore_unknown_options": True})
def curate() -> None:
    """Build the aligned set: describe → Continue → LLM fix → filters → review."""


@curate.command("run", context_settings={"ignore_unknown_options": True})
@click.argument("overrides", nargs=-1, metavar="[KEY=VALUE]...")
@config_option
@options_from(
    CurateConfig,
    Flag("model_source", "--model", metavar="RUN_OR_PRESET"), Flag("images", metavar="SHARDS_OR_DIR"),
    Flag("out", metavar="DIR"), "num", "batch_size", "generate.max_new_tokens", "device", "model.quantize",
    Flag("fixer.backend", "--fixer", metavar="none|rules|openai|hf:PATH"), Flag("fixer.url", "--fixer-url"),
    Flag("fixer.model", "--fixer-model"), Flag("fixer.key", "--fixer-key"),
    Flag("reject", type=EXISTING_FILE),
)  # fmt: skip
@output_options
@click.pass_context
def run(
    ctx: click.Context, config_path: str | None, overrides: tuple[str, ...], as_json: bool, quiet: bool
) -> None:
    """Describe images with the stage-1 model, Continue short answers, fix, filter, write the aligned set.

    Resumable: run the same command again and finished images are skipped. Without --model: the
    default model ($MGPT4_MODEL, else `mgpt4 config set model`).
    Example: mgpt4 curate --model runs/stage1 --images shards/ --num 5000 --out aligned/ --fixer openai
    """
    from mgpt4.config import load_config
    from mgpt4.curate.pipeline import run_curate

    setup_logging(quiet or as_json)
    cfg = load_config(CurateConfig, config_path, config_overrides(ctx, overrides))
    if cfg.model_source is None:  # no --model, recipe or model_source=: the default model
        from mgpt4.user_config import default_model

        cfg = dataclasses.replace(cfg, model_source=default_model())
    with progress_bar("describing", quiet or as_json) as bar:
        summary = run_curate(cfg, bar)
    _show(summary, as_json, quiet)


@curate.command("review")
@click.argument("ids", nargs=-1)
@options_from(ReviewConfig, Flag("out", type=click.Path(file_okay=False)), Flag("reject", type=EXISTING_FILE))
@output_options
@click.pass_context
def review(ctx: click.Context, ids: tuple[str, ...], as_json: bool, quiet: bool) -> None:
    """Drop the ids a person rejected; rewrite filter_cap.json, image/ and report.html.

    Example: mgpt4 curate review --out aligned/ --reject ids.txt
    """
    from mgpt4.config import load_config
    from mgpt4.curate.pipeline import run_review

    setup_logging(quiet or as_json)
    cfg = load_config(ReviewConfig, None, config_overrides(ctx, [f"ids={json.dumps(list(ids))}"]))
    _show(run_review(cfg), as_json, quiet)


def _show(summary, as_json: bool, quiet: bool) -> None:
    if as_json:
        click.echo(json.dumps(summary.to_json(), indent=2))
        return
    if quiet:
        return
    table = Table(title=f"curate → {summary.out}", show_header=True)
    table.add_column("")
    table.add_column("images", justify="right")
    for name in ("images", "accepted", "rejected", "continued"):
        table.add_row(name, str(getattr(summary, name)))
    for name, count in summary.rejected_by.items():
        if count or name not in ("fix_error", "unreadable", "review"):  # every content filter, even at 0
            table.add_row(f"  rejected by {name}", str(count))
    console.print(table)
    console.print(f"set: {summary.filter_cap}   review: {summary.report}")
