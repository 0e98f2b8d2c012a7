"""``mgpt4 demo``: the whole lifecycle on the built-in shapes, with a banner per stage and a score table.

``render_demo`` draws from the JSON summary (``score.json``), so bench/demo_readme.py prints recorded runs
exactly as the command did.
"""

from __future__ import annotations

import contextlib
import json
import sys
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from mgpt4.cli.console import console, err_console, setup_logging
from mgpt4.cli.options import config_option, config_overrides, options_from
from mgpt4.demo import DemoConfig

_STAGES = ("download", "pretrain", "curate", "finetune", "describe")


@click.command(context_settings={"ignore_unknown_options": True})
@click.argument("overrides", nargs=-1, metavar="[KEY=VALUE]...")
@config_option
@options_from(DemoConfig, "quick", "from_scratch", "out")
@click.option("--json", "as_json", is_flag=True, help="print the summary as JSON on stdout")
@click.option("--quiet", "-q", is_flag=True, help="warnings only on stderr")
@click.pass_context
def demo(ctx: click.Context, overrides: tuple[str, ...], config_path: str | None, as_json: bool,
         quiet: bool) -> None:  # fmt: skip
    """The whole lifecycle on the built-in shapes data set, on CPU, with a measured score.

    download (loopback HTTP) → pretrain → curate → finetune → describe + score. As in MiniGPT-4, only
    llama_proj trains, between the shipped micro ViT and LLM (pretrained separately, frozen). Leaves
    RUN/stage2 for `mgpt4 describe --model runs/demo/stage2 IMG` and `mgpt4 chat --model runs/demo/stage2`.
    """
    from mgpt4.config import load_config
    from mgpt4.demo import run_demo

    setup_logging(quiet or as_json)
    cfg = load_config(DemoConfig, config_path, config_overrides(ctx, overrides))
    # DeepSpeed prints to stdout; with --json only the summary goes there.
    with contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext():
        summary = run_demo(cfg, progress=None if (quiet or as_json) else stage_banner)
    if as_json:
        click.echo(json.dumps(summary.to_json(), indent=2))
    elif not quiet:
        render_demo(summary.to_json(), console)


def stage_banner(name: str, what: str) -> None:
    """Announce a stage on stderr (progress of the stage itself follows below it)."""
    index = _STAGES.index(name) + 1 if name in _STAGES else 0
    err_console.rule(f"[bold]{index}/5 {name}[/bold] — {what}", align="left")


def render_demo(summary: dict[str, Any], target: Console) -> None:
    """The per-stage timing table, the score table and the example answers of a JSON summary."""
    stages = Table(title="mgpt4 demo", title_justify="left")
    stages.add_column("stage")
    stages.add_column("seconds", justify="right")
    stages.add_column("result")
    for stage in summary["stages"]:
        stages.add_row(stage["name"], f"{stage['seconds']:.1f}", stage["detail"])
    stages.add_section()
    stages.add_row("total", f"{summary['total_seconds']:.1f}", "")
    target.print(stages)
    score = summary["score"]
    table = Table(title=f"score on {score['n']} held-out test images", title_justify="left")
    keys = ("accuracy", "shape", "colour", "position", "count", "correct", "exact")
    for column in ("accuracy", "shape", "colour", "position", "count", "all correct", "exact"):
        table.add_column(column, justify="right")
    table.add_row(*(f"{score[k]:.2f}" for k in keys))
    target.print(table)
    target.print(_examples(summary))
    stage1 = summary["parameters"]["stage1"]
    how = (
        "every module of a fresh micro model trained"
        if summary["from_scratch"]
        # micro-patches is shaped like the Llama-2 MiniGPT-4: no Q-Former, so llama_proj is all there is.
        else "only llama_proj trained (the micro preset has no Q-Former, like the Llama-2 MiniGPT-4); "
        "the shipped micro ViT and LLM stayed frozen (--from-scratch compares)"
    )
    target.print(
        f"{stage1['trained']:,} of {stage1['total']:,} parameters trained in stage 1: {how}.\n"
        f"Try: mgpt4 describe --model {summary['out']}/stage2 {summary['example_image']}\n"
        f"     mgpt4 chat --model {summary['out']}/stage2"
    )  # fmt: skip


def _examples(summary: dict[str, Any]) -> Table:
    """The example image answered by the stage-1 model (own format, chat template) and by stage 2."""
    table = Table(title=f"one test image: {summary['example_reference']}", title_justify="left")
    table.add_column("model")
    table.add_column("prompt")
    table.add_column("answer")
    for example in summary["examples"]:
        table.add_row(
            example["model"].replace("stage", "stage "), repr(example["prompt"])[1:-1], example["answer"]
        )
    return table
