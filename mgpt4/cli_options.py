"""Argument helpers shared by the command modules: recipe + overrides, flags → overrides, inputs."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import click


def config_options(fn: Callable) -> Callable:
    """``--config recipe.yaml`` plus trailing ``key.sub=value`` overrides."""
    fn = click.argument("overrides", nargs=-1, metavar="[KEY=VALUE]...")(fn)
    return click.option(
        "--config",
        "-c",
        "config_path",
        default=None,
        metavar="RECIPE",
        help="recipe YAML (a path, or a built-in name from `mgpt4 recipes`)",
    )(fn)


def as_overrides(flags: dict[str, Any], keys: dict[str, str]) -> list[str]:
    """``key=value`` for every flag that was given (not None); JSON values parse as YAML."""
    return [f"{key}={json.dumps(flags[flag])}" for flag, key in keys.items() if flags.get(flag) is not None]


def split_args(args: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """Positional arguments → (inputs, ``key.sub=value`` overrides); an existing path is always an input."""
    inputs, overrides = [], []
    for arg in args:
        is_override = "=" in arg and arg.partition("=")[0].replace(".", "").replace("_", "").isalnum()
        (overrides if is_override and not os.path.exists(arg) else inputs).append(arg)
    return inputs, overrides
