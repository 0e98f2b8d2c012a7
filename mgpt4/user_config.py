"""The user's own settings: which model ``describe``/``chat`` use when no ``--model`` is given.

Looked up in order: ``$MGPT4_MODEL``, then ``model:`` in the user config file — ``$XDG_CONFIG_HOME/
mgpt4/config.yaml``, or ``~/.config/mgpt4/config.yaml`` when XDG_CONFIG_HOME is unset (the XDG Base
Directory spec's default). The file is read with the project's safe YAML loader.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from mgpt4.config import parse_yaml
from mgpt4.errors import ConfigError, UsageError

MODEL_ENV = "MGPT4_MODEL"


def user_config_file() -> Path:
    """Where the user config file lives (it may not exist)."""
    base = os.environ.get("XDG_CONFIG_HOME", "").strip()
    # XDG spec: a relative XDG_CONFIG_HOME is invalid and must be ignored.
    root = Path(base) if base and Path(base).is_absolute() else Path.home() / ".config"
    return root / "mgpt4" / "config.yaml"


def read_user_config() -> dict[str, Any]:
    """The user config file as a mapping ({} when there is none).

    Raises:
        ConfigError: unreadable file, invalid YAML, or not a mapping (names the file).
    """
    file = user_config_file()
    if not file.is_file():
        return {}
    try:
        data = parse_yaml(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"{file}: not a readable YAML file ({detail})") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{file}: expected 'key: value' lines, found {type(data).__name__}")
    return data


def default_model() -> str:
    """The model to use when none is given: ``$MGPT4_MODEL``, else ``model:`` in the user config file.

    Raises:
        UsageError: neither is set (says exactly how to set one); ConfigError: a bad config file.
    """
    from_env = os.environ.get(MODEL_ENV, "").strip()
    if from_env:
        return from_env
    file = user_config_file()
    value = read_user_config().get("model")
    if value is not None and not isinstance(value, str | os.PathLike):
        raise ConfigError(f"{file}: model: expected a path or preset name, got {value!r}")
    if value and str(value).strip():
        return str(value).strip()
    raise UsageError(
        f"no model given and no default set: pass --model FOLDER, or set a default with "
        f"`export {MODEL_ENV}=FOLDER` or a line `model: FOLDER` in {file}"
    )
