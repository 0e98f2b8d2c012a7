"""Terminal output of ``mgpt4 demo``: a banner per stage and the final summary table."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from mgpt4.console import err_console

_STAGES = ("download", "pretrain", "curate", "finetune", "describe")


def stage_banner(name: str, what: str) -> None:
    """Announce a stage on stderr (progress of the stage itself follows below it)."""
    index = _STAGES.index(name) + 1 if name in _STAGES else 0
    err_console.rule(f"[bold]{index}/5 {name}[/bold] — {what}", align="left")


def render_demo(summary: dict[str, Any], console: Console) -> None:
    """The per-stage timing table and the score table."""
    stages = Table(title="mgpt4 demo", title_justify="left")
    stages.add_column("stage")
    stages.add_column("seconds", justify="right")
    stages.add_column("result")
    for stage in summary["stages"]:
        stages.add_row(stage["name"], f"{stage['seconds']:.1f}", stage["detail"])
    stages.add_section()
    stages.add_row("total", f"{summary['total_seconds']:.1f}", "")
    console.print(stages)
    score = summary["score"]
    table = Table(title=f"score on {score['n']} held-out test images", title_justify="left")
    keys = ("accuracy", "shape", "colour", "position", "count", "correct", "exact")
    for column in ("accuracy", "shape", "colour", "position", "count", "all correct", "exact"):
        table.add_column(column, justify="right")
    table.add_row(*(f"{score[k]:.2f}" for k in keys))
    console.print(table)
    console.print(_examples(summary))
    stage1 = summary["parameters"]["stage1"]
    how = (
        "every module of a fresh micro model trained"
        if summary["from_scratch"]
        else "only llama_proj trained, the shipped micro ViT and LLM stayed frozen (--from-scratch compares)"
    )
    console.print(
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
