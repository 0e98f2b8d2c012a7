"""``mgpt4 eval TASK DATA`` (answer, score, report) and ``mgpt4 eval compare DIR_A DIR_B``."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import click
from rich.table import Table

from mgpt4.cli.console import console, progress_bar, setup_logging, warn
from mgpt4.cli.infer import DECODING_FLAGS, MODEL_FLAGS, model_option, model_overrides
from mgpt4.cli.options import (
    Flag,
    RunByDefaultGroup,
    config_option,
    config_overrides,
    options_from,
    output_options,
    split_args,
)
from mgpt4.errors import UsageError
from mgpt4.eval.config import TASK_NAMES, EvalConfig

if TYPE_CHECKING:
    from rich.console import Console

    from mgpt4.eval.compare import Comparison


@click.group(cls=RunByDefaultGroup, no_args_is_help=True, context_settings={"ignore_unknown_options": True})
def eval_() -> None:  # not `eval`: that name is Python's
    """Measure a model: captions, pope, vqa, judge or shapes (`mgpt4 eval compare A B` for two runs)."""


@eval_.command("run", context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, metavar="TASK [DATA] [KEY=VALUE]...")
@config_option
@model_option
@options_from(EvalConfig, *MODEL_FLAGS, *DECODING_FLAGS)
@options_from(
    EvalConfig, Flag("out", "-o", metavar="DIR"), "limit", Flag("batch_size", "-b"), Flag("prompt", "-p"),
    "prompt_style", Flag("images", metavar="DIR"), "meteor", Flag("judge.url", "--judge-url"),
    Flag("judge.model", "--judge-model"), Flag("judge.key", "--judge-key"),
)  # fmt: skip
@output_options
@click.pass_context
def run(ctx: click.Context, args: tuple[str, ...], config_path: str | None, model_source: str | None,
        as_json: bool, quiet: bool) -> None:  # fmt: skip
    """Answer every item of TASK's DATA (fresh conversation per question, batched like describe), score,
    and write OUT/answers.jsonl, scores.json and report.html. Rerun to resume.

    TASK is one of captions, pope, vqa, judge, shapes. DATA: a COCO captions JSON, a cc_sbu_align
    folder or a shard set (captions); JSON lines (pope, vqa, judge); a demo test folder (shapes; none =
    200 built-in images). Malformed data exits 2 naming the file and line.

    \b
    Examples:
      mgpt4 eval -m runs/demo/stage2 shapes runs/demo/data/test
      mgpt4 eval -m runs/stage2 pope pope_random.jsonl --images coco/val2014 --out evals/pope
      mgpt4 eval -m runs/stage2 captions captions_val2014.json --images coco/val2014 --limit 500 --json
      mgpt4 eval compare evals/stage1 evals/stage2
    """
    from mgpt4.config import load_config
    from mgpt4.eval.pipeline import run_eval

    setup_logging(quiet or as_json)
    positional, key_values = split_args(args)
    if not positional or len(positional) > 2:
        raise UsageError(
            f"eval: give TASK [DATA] (TASK: {', '.join(TASK_NAMES)}), got {' '.join(positional)}"
        )
    task = positional[0]
    if task not in TASK_NAMES:
        raise UsageError(f"eval: unknown task '{task}'; choose one of {', '.join(TASK_NAMES)}")
    overrides = config_overrides(ctx, key_values) + [f"task={task}"]
    overrides += [f"data={json.dumps(positional[1])}"] if len(positional) == 2 else []
    overrides += model_overrides(model_source, config_path, key_values)
    cfg = load_config(EvalConfig, config_path, overrides)
    with progress_bar("answering", quiet or as_json) as bar:
        result = run_eval(cfg, bar)
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2))
        return
    if quiet:
        return
    table = Table(title=f"eval {result.task} → {result.out}", title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in flat_metrics(result.metrics).items():
        table.add_row(name, metric_text(value))
    console.print(table)
    speed = f", {result.answers_per_s:.2f} answers/s" if result.answers_per_s else ""
    console.print(
        f"{result.items} items ({result.answered_now} answered now, {result.resumed} from an earlier run, "
        f"{result.errors} unreadable) in {result.seconds:.1f} s{speed}"
    )
    for note in result.notes:
        warn(f"note: {note}")
    console.print(f"answers: {result.answers}   scores: {result.scores}   report: {result.report}")


@eval_.command("compare")
@click.argument("dir_a", type=click.Path(file_okay=False))
@click.argument("dir_b", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="print the comparison as JSON on stdout")
def compare(dir_a: str, dir_b: str, as_json: bool) -> None:
    """Two eval runs side by side: every metric in A and B, and the difference B − A."""
    from mgpt4.eval.compare import compare as compare_runs

    comparison = compare_runs(dir_a, dir_b)
    if as_json:
        click.echo(json.dumps(comparison.to_json(), indent=2))
        return
    render_comparison(comparison, console)


def render_comparison(comparison: Comparison, target: Console) -> None:
    """The side-by-side table of a `compare` result and its notes, on a rich console."""
    title = comparison.task_a if comparison.task_a == comparison.task_b else "eval"
    target.print(f"{title}: A = {comparison.a}, B = {comparison.b}", markup=False, soft_wrap=True)
    table = Table()
    table.add_column("metric")
    table.add_column("A", justify="right")
    table.add_column("B", justify="right")
    table.add_column("B − A", justify="right")
    for row in comparison.rows:
        difference = "" if row.difference is None else f"{row.difference:+.4f}"
        style = "green" if (row.difference or 0) > 0 else "red" if (row.difference or 0) < 0 else ""
        table.add_row(
            row.metric,
            metric_text(row.a),
            metric_text(row.b),
            f"[{style}]{difference}[/]" if style else difference,
        )
    target.print(table)
    for note in comparison.notes:
        target.print(f"note: {note}", markup=False)


def flat_metrics(metrics: dict, prefix: str = "") -> dict:
    flat = {}
    for name, value in metrics.items():
        if isinstance(value, dict):
            flat.update(flat_metrics(value, f"{prefix}{name}."))
        else:
            flat[f"{prefix}{name}"] = value
    return flat


def metric_text(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)
