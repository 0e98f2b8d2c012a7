"""``mgpt4 download`` and ``mgpt4 download report``: options, the progress bar and the summary table."""

from __future__ import annotations

import contextlib
import json
import sys

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from mgpt4.cli.console import console, err_console, is_interactive, setup_logging
from mgpt4.cli.options import (
    Flag,
    RunByDefaultGroup,
    config_option,
    config_overrides,
    options_from,
    output_options,
    split_args,
)
from mgpt4.download.config import DownloadConfig
from mgpt4.download.progress import DownloadStatus
from mgpt4.download.report import DownloadSummary


@click.group(cls=RunByDefaultGroup, no_args_is_help=False, context_settings={"ignore_unknown_options": True})
def download() -> None:
    """URL lists → img2dataset-compatible WebDataset shards (resumable: rerun the same command)."""


@download.command("run", context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, metavar="INPUT... [KEY=VALUE]...")
@options_from(
    DownloadConfig,
    Flag("output", "--out", "-o"), "url_col", "caption_col", "preset", "shard_size",
    Flag("image.size", "--image-size"), "image.resize_mode", "image.jpeg_quality",
    Flag("image.min_size", "--min-image-size"), "processes", "threads", "fetch.timeout", "retry_failed",
    "distributor", "ray_address", "node_rank", "num_nodes",
)  # fmt: skip
@output_options
@config_option
@click.pass_context
def run(
    ctx: click.Context, args: tuple[str, ...], config_path: str | None, quiet: bool, as_json: bool
) -> None:
    """URL lists → img2dataset-compatible WebDataset shards (resumable: rerun the same command).

    INPUT files may be json (list of objects), jsonl, csv, tsv, parquet or txt (URLs only), optionally
    gzipped. Trailing KEY=VALUE pairs set any setting (e.g. fetch.max_per_host=4); see the saved
    OUT/download_config.yaml for every key.
    """
    from mgpt4.config import load_config
    from mgpt4.download.run import run_download

    setup_logging(quiet or as_json)
    inputs, key_values = split_args(args)
    positional = [f"inputs={json.dumps(inputs)}"] if inputs else []
    cfg = load_config(DownloadConfig, config_path, [*config_overrides(ctx, key_values), *positional])
    cfg.validate()
    # Ray's driver prints its cluster's messages (a worker died, task logs) to stdout; with --json only the
    # summary goes there.
    with contextlib.redirect_stdout(sys.stderr):
        if quiet or not is_interactive():
            summary = run_download(cfg)
        else:
            with ProgressBar() as bar:
                summary = run_download(cfg, progress=bar)
    if as_json:
        click.echo(json.dumps(summary.to_json(), indent=2))
    elif not quiet:
        render_summary(summary, console)


@download.command("report")
@click.option("--out", "-o", "output", required=True, help="the output folder (a path or an fsspec URL)")
@click.option("--json", "as_json", is_flag=True, help="print the summary as JSON on stdout")
def report(output: str, as_json: bool) -> None:
    """Sum up every complete shard of a folder, e.g. after `--node-rank R --num-nodes N` runs."""
    from mgpt4.download.report import merge_report

    summary = merge_report(output)
    if as_json:
        click.echo(json.dumps(summary.to_json(), indent=2))
    else:
        render_summary(summary, console)


class ProgressBar:
    """A rich bar on stderr (rows, images/s, success rate, ETA); call it with each ``DownloadStatus``."""

    def __init__(self, target: Console = err_console) -> None:
        self._bar = Progress(
            TextColumn("[bold]download"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]:>7.1f} img/s"),
            TextColumn("ok {task.fields[ok_pct]:>5.1f}%"),
            TimeRemainingColumn(),
            console=target,
            transient=False,
        )
        self._task = self._bar.add_task("download", total=None, rate=0.0, ok_pct=0.0)

    def __enter__(self) -> ProgressBar:
        self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._bar.stop()

    def __call__(self, status: DownloadStatus) -> None:
        self._bar.update(
            self._task,
            completed=status.completed,
            total=status.total,
            rate=status.images_per_s,
            ok_pct=status.ok_pct,
        )


def render_summary(summary: DownloadSummary, target: Console) -> None:
    """The end-of-run table: this run's counts by error reason, and the folder's totals."""
    from mgpt4.download.fetch import TRANSIENT_KINDS

    run, shards = summary.run, summary.shards
    if summary.scope == "folder":  # `mgpt4 download report`: every shard, whichever run wrote it
        head = f"{run['rows']} rows in complete shards, {run['seconds']:.1f} s from first to last shard"
        tail = f"shards: {shards['written']} complete, {shards['incomplete']} incomplete"
        if shards.get("missing") is not None:
            tail += f", {shards['missing']} not started"
    else:
        head = f"{run['rows']} rows fetched in {run['seconds']:.1f} s"
        tail = (
            f"shards: {shards['written']} written, {shards['skipped']} already complete, "
            f"{shards['incomplete']} incomplete"
        )
    target.print(
        f"[bold]{summary.output}[/]: {head} — {run['successes']} ok ({run['success_rate'] * 100:.1f}%), "
        f"{run['images_per_s']:.1f} img/s; {tail}"
    )
    if run["error_kinds"]:
        scope = "every complete shard" if summary.scope == "folder" else "this run"
        table = Table(title=f"failures by reason ({scope})", title_justify="left")
        table.add_column("reason")
        table.add_column("rows", justify="right")
        table.add_column("share", justify="right")
        table.add_column("retry", justify="center")
        table.add_column("example", overflow="fold")
        for kind, count in sorted(run["error_kinds"].items(), key=lambda kv: -kv[1]):
            share = f"{100 * count / max(run['rows'], 1):.1f}%"
            retry = "yes" if kind in TRANSIENT_KINDS else ""
            table.add_row(kind, str(count), share, retry, run["examples"].get(kind, ""))
        target.print(table)
        if any(kind in TRANSIENT_KINDS for kind in run["error_kinds"]):
            target.print("rows marked 'retry' failed for transient reasons: rerun with --retry-failed")
    total = summary.dataset
    target.print(
        f"folder total: {total['successes']} images from {total['rows']} rows in {total['shards']} "
        "complete shards"
    )
