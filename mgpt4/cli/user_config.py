"""``mgpt4 config set KEY VALUE`` and ``mgpt4 config show``: the user's settings (the default model)."""

from __future__ import annotations

import json

import click

from mgpt4.cli.console import console


@click.group("config")
def config() -> None:
    """Your own settings, kept in the XDG config dir: the default model (`$MGPT4_MODEL` wins over it)."""


@config.command("set")
@click.argument("key", metavar="KEY")
@click.argument("value", metavar="VALUE")
def set_(key: str, value: str) -> None:
    """Set one setting; `mgpt4 config set model FOLDER` makes FOLDER the default model."""
    from mgpt4.user_config import MODEL_ENV, set_user_value

    file, stored = set_user_value(key, value)
    console.print(f"{key}: {stored}  (in {file})", markup=False)
    if key == "model":
        import os

        if os.environ.get(MODEL_ENV, "").strip():
            console.print(f"note: ${MODEL_ENV} is set and wins over this file", markup=False)


@config.command("show")
@click.option("--json", "as_json", is_flag=True, help="print the settings as JSON on stdout")
def show(as_json: bool) -> None:
    """Where the settings file is, what it holds, and which default model describe/chat use."""
    from mgpt4.user_config import SETTINGS, default_model_and_origin, read_user_config, user_config_file

    file = user_config_file()
    settings = read_user_config()
    model, origin = default_model_and_origin()
    if as_json:
        click.echo(
            json.dumps({"file": str(file), "settings": settings, "model": model, "model_from": origin})
        )
        return
    console.print(f"settings file: {file}{'' if file.is_file() else '  (not created yet)'}", markup=False)
    for key in SETTINGS:
        console.print(f"{key}: {settings.get(key, '(not set)')}", markup=False)
    if model is None:
        console.print("default model: none — set one with `mgpt4 config set model FOLDER`", markup=False)
    else:
        console.print(f"default model: {model}  (from {origin})", markup=False)
