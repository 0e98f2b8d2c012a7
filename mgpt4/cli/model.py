"""``mgpt4 model info``: parameter counts and memory of a preset, as a table or JSON."""

from __future__ import annotations

import json

import click
from rich.table import Table

from mgpt4.cli.console import console


@click.group()
def model() -> None:
    """Inspect model presets."""


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
