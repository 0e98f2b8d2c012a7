"""The ``mgpt4`` command line: parse → build the config → call a library function → exit code.

Each command is a thin shell. Library code never prints to stdout for scripts or calls ``sys.exit``;
it returns data or raises an ``Mgpt4Error``, which ``main`` turns into one line on stderr and exit
code 2 (usage / bad input) or 1 (runtime failure). ``--debug`` shows the traceback instead.
``describe`` and ``chat`` live in ``mgpt4.infer.cli``; shared argument helpers in ``mgpt4.cli_options``.
"""

from __future__ import annotations

import json
import traceback
from collections.abc import Callable
from typing import Any

import click

from mgpt4 import __version__
from mgpt4.cli_options import as_overrides, config_options, split_args
from mgpt4.console import console, err_console
from mgpt4.errors import Mgpt4Error, UsageError
from mgpt4.infer.cli import chat, describe

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
@click.argument("args", nargs=-1, metavar="INPUT... [KEY=VALUE]...")
@click.option("--out", "-o", "output", default=None, help="output folder  [default: shards]")
@click.option("--url-col", default=None, help="URL column (default: the preset's, else url/URL)")
@click.option("--caption-col", default=None, help="caption column (default: the preset's, else caption/TEXT)")
@click.option("--preset", type=click.Choice(["laion", "cc_sbu"]), default=None, help="known column names")
@click.option("--shard-size", type=int, default=None, help="input rows per shard  [default: 10000]")
@click.option("--image-size", type=int, default=None, help="target size in pixels  [default: 224]")
@click.option(
    "--resize-mode", type=click.Choice(["border", "center_crop", "keep_ratio", "no"]), default=None,
    help="border (fit + white pad), center_crop, keep_ratio (short side) or no  [default: border]",
)
@click.option("--jpeg-quality", type=int, default=None, help="JPEG quality of stored images  [default: 95]")
@click.option("--min-image-size", type=int, default=None, help="drop images with a shorter side below this")
@click.option("--processes", type=int, default=None, help="worker processes  [default: one per core]")
@click.option("--threads", type=int, default=None, help="threads per process  [default: 32]")
@click.option("--timeout", type=float, default=None, help="seconds per request  [default: 10]")
@click.option("--retry-failed", is_flag=True, default=None,
              help="re-fetch rows that failed transiently (timeout, 5xx)")
@click.option("--quiet", "-q", is_flag=True, help="no progress, no summary; errors only")
@click.option("--json", "as_json", is_flag=True, help="print the summary as JSON on stdout")
@click.option("--config", "-c", "config_path", default=None, metavar="RECIPE", help="recipe YAML")
def download(
    args: tuple[str, ...], config_path: str | None, quiet: bool, as_json: bool, **flags: Any
) -> None:
    """URL lists → img2dataset-compatible WebDataset shards (resumable: rerun the same command).

    INPUT files may be json (list of objects), jsonl, csv, tsv, parquet or txt (URLs only), optionally
    gzipped. Trailing KEY=VALUE pairs override any setting (e.g. fetch.max_per_host=4); see the
    saved OUT/download_config.yaml for every key.
    """
    from mgpt4.config import load_config
    from mgpt4.console import is_interactive, setup_logging
    from mgpt4.data.download import DownloadConfig, run_download
    from mgpt4.data.download_report import render_summary

    setup_logging(quiet or as_json)
    inputs, overrides = split_args(args)
    keys = {name: name for name in ("output", "url_col", "caption_col", "preset", "shard_size", "processes",
                                    "threads", "retry_failed")}  # fmt: skip
    keys |= {"image_size": "image.size", "resize_mode": "image.resize_mode",
             "jpeg_quality": "image.jpeg_quality", "min_image_size": "image.min_size",
             "timeout": "fetch.timeout"}  # fmt: skip
    given = as_overrides(flags, keys) + ([f"inputs={json.dumps(inputs)}"] if inputs else [])
    cfg = load_config(DownloadConfig, config_path, overrides + given)
    cfg.validate()
    summary = run_download(cfg, show_progress=not quiet and is_interactive())
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    elif not quiet:
        render_summary(summary, console)


def _launch_options(fn: Callable) -> Callable:
    """Process-count and multi-node options shared by pretrain and finetune."""
    options = [
        click.option("--gpus", type=int, default=1, show_default=True,
                     help="processes per node (GPUs; on a CPU machine, gloo processes)"),
        click.option("--hostfile", type=click.Path(dir_okay=False), help="DeepSpeed hostfile for multi-node"),
        click.option("--num-nodes", type=int, help="nodes to use from the hostfile"),
        click.option("--master-addr", help="address of the rank-0 node (multi-node)"),
        click.option("--master-port", type=int, help="rendezvous port"),
        click.option("--json", "as_json", is_flag=True, help="print the run summary as JSON on stdout"),
        click.option("--quiet", "-q", is_flag=True, help="warnings only on stderr"),
    ]  # fmt: skip
    for option in reversed(options):
        fn = option(fn)
    return config_options(fn)


def _train_command(command: str, stage: int, config_path: str | None, overrides: tuple[str, ...],
                   init: str | None, flags: dict[str, Any]) -> None:  # fmt: skip
    import contextlib
    import sys

    from mgpt4.config import load_config
    from mgpt4.console import setup_logging
    from mgpt4.train.config import TrainRunConfig
    from mgpt4.train.launch import LaunchOptions, run_training

    setup_logging(flags["quiet"] or flags["as_json"])
    extra = [f"stage={stage}"] + ([f"init={init}"] if init else [])
    cfg = load_config(TrainRunConfig, config_path, [*overrides, *extra])
    launch = LaunchOptions(flags["gpus"], flags["hostfile"], flags["num_nodes"], flags["master_addr"],
                           flags["master_port"])  # fmt: skip
    # DeepSpeed prints and logs to stdout; while training, stdout is stderr so that stdout holds only
    # the summary (--json output stays parseable).
    with contextlib.redirect_stdout(sys.stderr):
        summary = run_training(cfg, launch, command)
    if flags["as_json"]:
        click.echo(json.dumps(summary, indent=2))
    elif not flags["quiet"]:
        loss = summary["final_loss"]
        console.print(f"{command}: {summary['steps']} steps, final loss {loss:.4f} → {summary['run']}")


@cli.command(context_settings={"ignore_unknown_options": True})
@_launch_options
def pretrain(config_path: str | None, overrides: tuple[str, ...], **flags: Any) -> None:
    """Stage 1: align the projection on image-caption shards (DeepSpeed; rerun to resume)."""
    _train_command("pretrain", 1, config_path, overrides, None, flags)


@cli.command(context_settings={"ignore_unknown_options": True})
@click.option("--init", metavar="RUN", help="start from this stage-1 run's (or checkpoint's) weights")
@_launch_options
def finetune(config_path: str | None, overrides: tuple[str, ...], init: str | None, **flags: Any) -> None:
    """Stage 2: finetune on the aligned set with the chat template (DeepSpeed; rerun to resume)."""
    _train_command("finetune", 2, config_path, overrides, init, flags)


@cli.command()
@click.argument("run", type=click.Path(exists=True, file_okay=False))
@click.option("--output", "-o", type=click.Path(dir_okay=False), help="PNG path (default RUN/loss.png)")
def plot(run: str, output: str | None) -> None:
    """Draw a run's loss curve from its metrics.jsonl."""
    from mgpt4.train.metrics import plot_loss, read_metrics

    if not read_metrics(run):
        raise UsageError(f"{run}: no metrics.jsonl lines to plot")
    click.echo(str(plot_loss(run, output)))


class _CurateGroup(click.Group):
    """``mgpt4 curate [OPTIONS]`` runs the pipeline (subcommand ``run``); ``mgpt4 curate review`` reviews."""

    def resolve_command(self, ctx: click.Context, args: list[str]) -> tuple[str | None, Any, list[str]]:
        if args and args[0] in self.commands:
            return super().resolve_command(ctx, args)
        return "run", self.commands["run"], args

    def format_help(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        run_cmd = self.commands["run"]
        run_cmd.format_help(click.Context(run_cmd, info_name=ctx.info_name, parent=ctx.parent), formatter)
        self.format_commands(ctx, formatter)


@cli.group(cls=_CurateGroup, context_settings={"ignore_unknown_options": True})
def curate() -> None:
    """Build the aligned set: describe → Continue → LLM fix → filters → review."""


@curate.command("run", context_settings={"ignore_unknown_options": True})
@config_options
@click.option(
    "--model", "model_source", metavar="RUN_OR_PRESET", help="stage-1 run dir, checkpoint folder or preset"
)
@click.option(
    "--images", metavar="SHARDS_OR_DIR", help="folder of images, or shards (folder/.tar/brace pattern)"
)
@click.option(
    "--out", metavar="DIR", help="output folder: image/ + filter_cap.json + curate.jsonl + report.html"
)
@click.option("--num", type=int, help="describe the first N images (default 5000)")
@click.option("--batch-size", type=int, help="images per generate call (default 8)")
@click.option("--max-new-tokens", type=int, help="tokens per turn (default 300)")
@click.option("--device", help="auto, cpu, cuda, cuda:N")
@click.option(
    "--fixer", "fixer_backend", metavar="none|rules|openai|hf:PATH", help="fix step backend (default rules)"
)
@click.option("--fixer-url", help="openai: base URL …/v1 (default env OPENAI_BASE_URL)")
@click.option("--fixer-model", help="openai: model name")
@click.option("--fixer-key", help="openai: API key (default env OPENAI_API_KEY; never saved)")
@click.option(
    "--reject", type=click.Path(exists=True, dir_okay=False), help="ids a reviewer rejected (one per line)"
)
@click.option("--json", "as_json", is_flag=True, help="print the summary as JSON on stdout")
@click.option("--quiet", "-q", is_flag=True, help="warnings only on stderr, no summary table")
def curate_run(
    config_path: str | None, overrides: tuple[str, ...], as_json: bool, quiet: bool, **flags: Any
) -> None:
    """Describe images with the stage-1 model, Continue short answers, fix, filter, write the aligned set.

    Resumable: run the same command again and finished images are skipped.
    Example: mgpt4 curate --model runs/stage1 --images shards/ --num 5000 --out aligned/ --fixer openai
    """
    from mgpt4.config import load_config
    from mgpt4.console import setup_logging
    from mgpt4.curate.pipeline import CurateConfig, run_curate

    setup_logging(quiet or as_json)
    keys = {name: name for name in ("model_source", "images", "out", "num", "batch_size", "device", "reject")}
    keys |= {"fixer_backend": "fixer.backend", "fixer_url": "fixer.url", "fixer_model": "fixer.model",
             "fixer_key": "fixer.key", "max_new_tokens": "generate.max_new_tokens"}  # fmt: skip
    cfg = load_config(CurateConfig, config_path, [*overrides, *as_overrides(flags, keys)])
    cfg.validate()
    summary = _with_progress(lambda progress: run_curate(cfg, progress), "describing", quiet or as_json)
    _curate_summary(summary, as_json, quiet)


@curate.command("review")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="the curated folder")
@click.option(
    "--reject",
    type=click.Path(exists=True, dir_okay=False),
    help="ids to drop, one per line (e.g. from report.html)",
)
@click.argument("ids", nargs=-1)
@click.option("--json", "as_json", is_flag=True, help="print the summary as JSON on stdout")
@click.option("--quiet", "-q", is_flag=True, help="warnings only on stderr, no summary table")
def curate_review(out: str, reject: str | None, ids: tuple[str, ...], as_json: bool, quiet: bool) -> None:
    """Drop the ids a person rejected; rewrite filter_cap.json, image/ and report.html.

    Example: mgpt4 curate review --out aligned/ --reject ids.txt
    """
    from mgpt4.console import setup_logging
    from mgpt4.curate.pipeline import run_review
    from mgpt4.curate.records import read_ids

    setup_logging(quiet or as_json)
    wanted = (read_ids(reject) if reject else []) + list(ids)
    if not wanted:
        raise UsageError("curate review: give --reject FILE and/or ids to drop")
    _curate_summary(run_review(out, wanted), as_json, quiet)


def _with_progress(work: Callable[[Callable], Any], label: str, quiet: bool) -> Any:
    """Run ``work(progress)`` with a rich bar on a TTY; plain log lines (from the library) otherwise."""
    from mgpt4.console import is_interactive

    if quiet or not is_interactive():
        return work(None)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=True,
    ) as bar:
        task = bar.add_task(label, total=None)
        return work(lambda done, total: bar.update(task, completed=done, total=total))


def _curate_summary(summary: dict[str, Any], as_json: bool, quiet: bool) -> None:
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    if quiet:
        return
    from rich.table import Table

    table = Table(title=f"curate → {summary['out']}", show_header=True)
    table.add_column("")
    table.add_column("images", justify="right")
    for name in ("images", "accepted", "rejected", "continued"):
        table.add_row(name, str(summary[name]))
    for name, count in summary["rejected_by"].items():
        if count or name not in ("fix_error", "unreadable", "review"):  # every content filter, even at 0
            table.add_row(f"  rejected by {name}", str(count))
    console.print(table)
    console.print(f"set: {summary['filter_cap']}   review: {summary['report']}")


@cli.command(context_settings={"ignore_unknown_options": True})
@config_options
@click.option("--quick", is_flag=True, help="smaller and faster (about 90 s), as CI runs it")
@click.option("--from-scratch", is_flag=True,
              help="train every module of a fresh micro model, not only llama_proj between the shipped "
              "pretrained micro ViT and LLM (for comparison)")  # fmt: skip
@click.option("--out", default=None, help="output folder  [default: runs/demo]")
@click.option("--json", "as_json", is_flag=True, help="print the summary as JSON on stdout")
@click.option("--quiet", "-q", is_flag=True, help="warnings only on stderr")
def demo(config_path: str | None, overrides: tuple[str, ...], quick: bool, from_scratch: bool,
         out: str | None, as_json: bool, quiet: bool) -> None:  # fmt: skip
    """The whole lifecycle on the built-in shapes data set, on CPU, with a measured score.

    download (loopback HTTP) → pretrain → curate → finetune → describe + score. As in MiniGPT-4, only
    llama_proj trains, between the shipped micro ViT and LLM (pretrained separately, frozen). Leaves
    RUN/stage2 for `mgpt4 describe --model runs/demo/stage2 IMG` and `mgpt4 chat --model runs/demo/stage2`.
    """
    from mgpt4.config import load_config
    from mgpt4.console import setup_logging
    from mgpt4.demo import DemoConfig, run_demo
    from mgpt4.demo_report import render_demo, stage_banner

    setup_logging(quiet or as_json)
    extra = (["quick=true"] if quick else []) + (["from_scratch=true"] if from_scratch else [])
    extra += [f"out={out}"] if out else []
    cfg = load_config(DemoConfig, config_path, [*overrides, *extra])
    import contextlib
    import sys

    # DeepSpeed prints to stdout; with --json only the summary goes there.
    with contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext():
        summary = run_demo(cfg, on_stage=(lambda name, what: None) if (quiet or as_json) else stage_banner)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    elif not quiet:
        render_demo(summary, console)


cli.add_command(describe)
cli.add_command(chat)


# --------------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    cli.main(args=argv, prog_name="mgpt4")
