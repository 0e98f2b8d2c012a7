"""``mgpt4 model info`` (parameter counts and memory of a preset) and ``mgpt4 model import`` (the official
files → one model folder)."""

from __future__ import annotations

import json

import click
from rich.table import Table

from mgpt4.cli.console import console, setup_logging, warn
from mgpt4.cli.options import Flag, config_overrides, options_from
from mgpt4.model.import_config import ImportConfig


@click.group()
def model() -> None:
    """Inspect model presets; import the official files into one model folder."""


@model.command("info")
@click.argument("preset")
@click.option("--trainable", default="proj", show_default=True, help="comma list: proj,qformer,vision,llm")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def info(preset: str, trainable: str, as_json: bool) -> None:
    """Parameter counts per module, trainable vs frozen, estimated memory (nothing is allocated)."""
    from mgpt4.model.info import model_summary

    summary = model_summary(preset, [t.strip() for t in trainable.split(",") if t.strip()])
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        render_summary(summary)


@model.command("import")
@options_from(
    ImportConfig,
    "preset",
    Flag("vision", metavar="PTH"),
    Flag("qformer", metavar="PTH"),
    Flag("proj", metavar="PTH"),
    Flag("llm", metavar="DIR"),
    Flag("out", "-o", metavar="DIR"),
    target="import",  # flags only: `model import` takes no KEY=VALUE
)
@click.option("--json", "as_json", is_flag=True, help="print the result as JSON on stdout")
@click.pass_context
def import_(ctx: click.Context, as_json: bool) -> None:
    """The official files → one model folder (safetensors + config.yaml) that `-m FOLDER` loads.

    Every key of every file is checked first; nothing is written when one is wrong. The folder never
    needs a pickle again and loads faster than the .pth files.

    \b
    Example:
      mgpt4 model import --preset vicuna-7b --vision eva_vit_g.pth --qformer blip2_pretrained_flant5xxl.pth \\
          --proj pretrained_minigpt4_7b.pth --llm vicuna-7b/ -o models/minigpt4-7b
      mgpt4 config set model models/minigpt4-7b       # then: mgpt4 describe photo.jpg
    """
    from mgpt4.config import load_config
    from mgpt4.model.importer import run_import

    setup_logging(as_json)
    cfg = load_config(ImportConfig, None, config_overrides(ctx, [], target="import"))
    result = run_import(cfg, progress=None if as_json else lambda note: warn(f"writing {note}"))
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2))
        return
    click.echo(result.out)
    warn(f"use it with `-m {result.out}`, or make it the default: mgpt4 config set model {result.out}")


def render_summary(summary: dict) -> None:
    """The per-module table and the memory estimate."""
    table = Table(title=f"{summary['preset']} — {summary['description']}", title_justify="left")
    for column in ("module", "group", "params", "trainable"):
        table.add_column(column, justify="right" if column == "params" else "left")
    for row in summary["modules"]:
        table.add_row(
            row["module"], row["group"], f"{row['params']:,}", "yes" if row["trainable"] else "frozen"
        )
    table.add_section()
    table.add_row("total", "", f"{summary['total_params']:,}", f"{summary['trainable_params']:,} trainable")
    console.print(table)
    memory = summary["memory_gib"]
    console.print(
        f"image tokens per image: {summary['image_tokens']}\n"
        f"memory (GiB): inference bf16 {memory['inference_bf16']}, fp32 {memory['inference_fp32']}; "
        f"training (bf16 + AdamW on trainable) {memory['train_bf16_adamw']}\n[dim]{summary['note']}[/dim]"
    )
