"""The CLI shell: help, version, recipes, model info, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

from click.testing import CliRunner

from mgpt4 import __version__
from mgpt4.cli import cli
from mgpt4.config import builtin_recipes

COMMANDS = (
    "download",
    "pretrain",
    "finetune",
    "plot",
    "curate",
    "describe",
    "chat",
    "eval",
    "serve",
    "demo",
    "model",
    "config",
    "recipes",
)


def test_help_lists_every_command():
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    for command in COMMANDS:
        assert f"  {command}" in result.output


def test_version_via_console_script():
    out = subprocess.run(
        [sys.executable, "-m", "mgpt4", "--version"], capture_output=True, text=True, check=True
    )
    assert __version__ in out.stdout


def test_model_info_vicuna_7b_counts_on_meta_device():
    result = CliRunner().invoke(cli, ["model", "info", "vicuna-7b", "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    modules = {m["module"]: m for m in info["modules"]}
    assert info["trainable_params"] == 768 * 4096 + 4096  # llama_proj only
    assert modules["llama_model"]["params"] == 6_738_415_616  # Llama-7B
    assert modules["visual_encoder"]["trainable"] is False
    assert info["memory_gib"]["inference_bf16"] > 14


def test_model_info_table_and_unknown_preset():
    runner = CliRunner()
    table = runner.invoke(cli, ["model", "info", "micro", "--trainable", "proj,llm"])
    assert table.exit_code == 0 and "llama_proj" in table.output and "trainable" in table.output
    bad = runner.invoke(cli, ["model", "info", "vicuna-8b"])
    assert bad.exit_code == 2
    assert "unknown model preset 'vicuna-8b': did you mean 'vicuna-7b'?" in bad.output


def test_recipes_list_and_show():
    runner = CliRunner()
    listing = runner.invoke(cli, ["recipes"])
    assert listing.exit_code == 0
    for name in builtin_recipes():
        assert name in listing.output
    if builtin_recipes():
        name, path = next(iter(sorted(builtin_recipes().items())))
        shown = runner.invoke(cli, ["recipes", "show", name])
        assert shown.exit_code == 0 and shown.output == path.read_text()
    missing = runner.invoke(cli, ["recipes", "show", "no-such-recipe"])
    assert missing.exit_code == 2 and "no-such-recipe" in missing.output
