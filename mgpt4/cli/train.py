"""``mgpt4 pretrain``, ``mgpt4 finetune`` (both stages on DeepSpeed) and ``mgpt4 plot``."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable

import click

from mgpt4.cli.console import console, setup_logging, step_bar
from mgpt4.cli.options import config_option, config_overrides, options_from, output_options
from mgpt4.errors import UsageError
from mgpt4.train.config import TrainRunConfig
from mgpt4.train.launch_options import LaunchOptions

LAUNCH = "launch"  # the target of the process-count flags (not saved in the run's config)


def _launch_options(fn: Callable) -> Callable:
    """Process-count and multi-node options shared by pretrain and finetune, from ``LaunchOptions``."""
    fn = options_from(
        LaunchOptions, "gpus", "hostfile", "num_nodes", "master_addr", "master_port", target=LAUNCH
    )(fn)
    fn = output_options(fn)
    fn = click.argument("overrides", nargs=-1, metavar="[KEY=VALUE]...")(fn)
    return config_option(fn)


@click.command(context_settings={"ignore_unknown_options": True})
@_launch_options
@click.pass_context
def pretrain(
    ctx: click.Context, config_path: str | None, overrides: tuple[str, ...], as_json: bool, quiet: bool
) -> None:
    """Stage 1: align the projection on image-caption shards (DeepSpeed; rerun to resume)."""
    _train(ctx, 1, config_path, overrides, as_json, quiet)


@click.command(context_settings={"ignore_unknown_options": True})
@options_from(TrainRunConfig, "init")
@_launch_options
@click.pass_context
def finetune(
    ctx: click.Context, config_path: str | None, overrides: tuple[str, ...], as_json: bool, quiet: bool
) -> None:
    """Stage 2: finetune on the aligned set with the chat template (DeepSpeed; rerun to resume)."""
    _train(ctx, 2, config_path, overrides, as_json, quiet)


def _train(ctx: click.Context, stage: int, config_path: str | None, overrides: tuple[str, ...],
           as_json: bool, quiet: bool) -> None:  # fmt: skip
    from mgpt4.config import load_config
    from mgpt4.train.launch import run_training

    setup_logging(quiet or as_json)
    command = ctx.info_name
    cfg = load_config(TrainRunConfig, config_path, [*config_overrides(ctx, overrides), f"stage={stage}"])
    launch = load_config(LaunchOptions, None, config_overrides(ctx, [], target=LAUNCH))
    # DeepSpeed prints and logs to stdout; while training, stdout is stderr so that stdout holds only
    # the summary (--json output stays parseable).
    with contextlib.redirect_stdout(sys.stderr), step_bar(quiet or as_json) as bar:
        summary = run_training(cfg, bar, launch)
    if as_json:
        click.echo(json.dumps(summary.to_json(), indent=2))
    elif not quiet:
        loss = summary.final_loss
        loss_text = f"final loss {loss:.4f}" if loss is not None else "no loss logged"
        if summary.already_finished:
            console.print(f"{command}: already finished at step {summary.resumed_from}, {loss_text} → "
                          f"{summary.run}")  # fmt: skip
        else:
            console.print(f"{command}: {summary.steps} steps, {loss_text} → {summary.run}")


@click.command()
@click.argument("run", type=click.Path(exists=True, file_okay=False))
@click.option("--output", "-o", type=click.Path(dir_okay=False), help="PNG path (default RUN/loss.png)")
def plot(run: str, output: str | None) -> None:
    """Draw a run's loss curve from its metrics.jsonl."""
    from mgpt4.train.metrics import plot_loss, read_metrics

    if not read_metrics(run):
        raise UsageError(f"{run}: no metrics.jsonl lines to plot")
    click.echo(str(plot_loss(run, output)))
