"""The ``mgpt4`` command line — the only code that imports click or rich.

Every command parses its arguments, builds its config (``options``), calls the library's
``run_<command>(cfg, progress=None)`` and renders the result it returns. ``main`` maps errors to exit
codes: an ``Mgpt4Error`` is one line on stderr and exit 2 (usage / bad input) or 1 (runtime failure);
``--debug`` shows the traceback; Ctrl-C is exit 130.

The command table below is the whole surface: name → the click command that calls the library.
"""

from __future__ import annotations

import traceback
from typing import Any

import click

from mgpt4 import __version__
from mgpt4.cli import curate, demo, download, infer, model, recipes, serve, train, user_config
from mgpt4.cli import eval as eval_cli
from mgpt4.cli.console import err_console
from mgpt4.errors import Mgpt4Error

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 110}

COMMANDS: dict[str, click.Command] = {
    "download": download.download,  # URL lists → WebDataset shards (download.run_download)
    "pretrain": train.pretrain,  # stage 1 (train.launch.run_training)
    "finetune": train.finetune,  # stage 2 (train.launch.run_training)
    "plot": train.plot,  # a run's loss curve (train.metrics.plot_loss)
    "curate": curate.curate,  # the aligned set (curate.pipeline.run_curate, run_review)
    "describe": infer.describe,  # captions for images (infer.describe.run_describe)
    "chat": infer.chat,  # a conversation (infer.chat.start_chat + ChatSession)
    "eval": eval_cli.eval_,  # measure a model (eval.pipeline.run_eval, eval.compare.compare)
    "serve": serve.serve,  # an OpenAI-compatible endpoint (serve.run_serve)
    "demo": demo.demo,  # the whole lifecycle on the shapes set (demo.run_demo)
    "model": model.model,  # model info, model import (model.info.model_summary, model.importer.run_import)
    "config": user_config.config,  # the default model (user_config.set_user_value)
    "recipes": recipes.recipes,  # built-in recipes (config.builtin_recipes)
}


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

    \b
    Settings, lowest precedence first (the same in every command):
      field defaults < --config RECIPE < KEY=VALUE arguments < explicit flags
    e.g. `mgpt4 describe -c my.yaml generate.max_new_tokens=50 --max-new-tokens 20 IMG` uses 20.
    Each flag's help names the key it sets.

    Exit codes: 0 ok, 1 runtime failure, 2 usage or bad input.
    """
    del debug  # read by _Mgpt4Group.invoke from ctx.params


for _name, _command in COMMANDS.items():
    cli.add_command(_command, _name)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    cli.main(args=argv, prog_name="mgpt4")
