"""The user's own settings: which model describe, chat, curate, eval and serve use with no ``--model``.

Looked up in order: ``$MGPT4_MODEL``, then ``model:`` in the user config file — ``$XDG_CONFIG_HOME/
mgpt4/config.yaml``, or ``~/.config/mgpt4/config.yaml`` when XDG_CONFIG_HOME is unset (the XDG Base
Directory spec's default). The file is read with the project's safe YAML loader and written by
``mgpt4 config set model PATH`` (``set_user_value``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from mgpt4.config import parse_yaml
from mgpt4.errors import ConfigError, UsageError

MODEL_ENV = "MGPT4_MODEL"
# What `mgpt4 config set KEY VALUE` may write, and what each means.
SETTINGS = {"model": "the default model: a model folder, run directory, checkpoint folder or preset"}


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


def default_model_and_origin() -> tuple[str | None, str | None]:
    """The default model and where it comes from (``$MGPT4_MODEL`` or the file), or (None, None).

    Raises:
        ConfigError: a bad config file.
    """
    from_env = os.environ.get(MODEL_ENV, "").strip()
    if from_env:
        return from_env, f"${MODEL_ENV}"
    file = user_config_file()
    value = read_user_config().get("model")
    if value is not None and not isinstance(value, str | os.PathLike):
        raise ConfigError(f"{file}: model: expected a path or preset name, got {value!r}")
    if value and str(value).strip():
        return str(value).strip(), str(file)
    return None, None


def set_user_value(key: str, value: str) -> tuple[Path, str]:
    """Write ``key: value`` into the user config file (atomically), keeping its other keys.

    A model folder is stored as an absolute path, so the default works from any directory.

    Returns:
        The file and the value as stored.

    Raises:
        UsageError: an unknown key, or a model that is neither a folder nor a preset.
        ConfigError: the existing file is not readable YAML.
    """
    if key not in SETTINGS:
        raise UsageError(f"config set: unknown setting '{key}'; settable: {', '.join(SETTINGS)}")
    if key == "model":
        value = _model_value(value)
    data = read_user_config()
    data[key] = value
    file = user_config_file()
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_name(file.name + ".tmp")
        header = "# mgpt4 user settings (`mgpt4 config set KEY VALUE`, `mgpt4 config show`)\n"
        tmp.write_text(header + yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
        tmp.replace(file)
    except OSError as exc:
        raise UsageError(f"{file}: cannot write ({exc.strerror or exc}); set {MODEL_ENV} instead") from exc
    return file, value


def _model_value(value: str) -> str:
    from mgpt4.model.presets import PRESETS

    if Path(value).expanduser().is_dir():
        return str(Path(value).expanduser().resolve())
    if value in PRESETS:
        return value
    raise UsageError(
        f"config set model {value}: not a folder or a preset ({', '.join(PRESETS)}); "
        "give a model folder (`mgpt4 model import … -o FOLDER`), a run directory or a checkpoint folder"
    )


def default_model() -> str:
    """The model to use when none is given: ``$MGPT4_MODEL``, else ``model:`` in the user config file.

    Raises:
        UsageError: neither is set (says exactly how to set one); ConfigError: a bad config file.
    """
    value, _ = default_model_and_origin()
    if value is not None:
        return value
    raise UsageError(
        f"no model given and no default set: pass --model FOLDER, or set a default with "
        f"`mgpt4 config set model FOLDER`, `export {MODEL_ENV}=FOLDER` or a line `model: FOLDER` in "
        f"{user_config_file()}"
    )
