"""The default model: ``$MGPT4_MODEL``, else ``model:`` in the XDG user config file, else a clear error."""

from __future__ import annotations

import pytest

from mgpt4.errors import ConfigError, UsageError
from mgpt4.user_config import default_model, user_config_file


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A clean environment: a fresh HOME, no XDG_CONFIG_HOME, no MGPT4_MODEL."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    monkeypatch.delenv("MGPT4_MODEL", raising=False)
    return tmp_path / "home"


def write_config(path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_neither_set_says_exactly_how_to_set_one(home):
    with pytest.raises(UsageError) as info:
        default_model()
    message = str(info.value)
    assert "\n" not in message
    assert "export MGPT4_MODEL=FOLDER" in message
    assert f"`model: FOLDER` in {home}/.config/mgpt4/config.yaml" in message


def test_config_file_under_home_then_xdg_then_the_environment_wins(home, tmp_path, monkeypatch):
    write_config(home / ".config" / "mgpt4" / "config.yaml", "model: models/minigpt4-7b\n")
    assert default_model() == "models/minigpt4-7b"

    xdg = tmp_path / "xdg"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(xdg))
    assert user_config_file() == xdg / "mgpt4" / "config.yaml"
    with pytest.raises(UsageError, match=rf"{xdg}/mgpt4/config\.yaml"):
        default_model()  # XDG_CONFIG_HOME set: the file under ~/.config no longer counts
    write_config(xdg / "mgpt4" / "config.yaml", "# mine\nmodel: /srv/models/13b\nother: 1\n")
    assert default_model() == "/srv/models/13b"

    monkeypatch.setenv("MGPT4_MODEL", "runs/stage2")
    assert default_model() == "runs/stage2"

    monkeypatch.setenv("XDG_CONFIG_HOME", "relative/dir")  # invalid per the XDG spec: ignored
    assert user_config_file() == home / ".config" / "mgpt4" / "config.yaml"


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("model: [unclosed\n", r"config\.yaml: not a readable YAML file"),
        ("!!python/object/apply:os.system ['touch pwned']\n", r"config\.yaml: not a readable YAML file"),
        ("- a list\n", r"config\.yaml: expected 'key: value' lines"),
        ("model: 3\n", r"config\.yaml: model: expected a path or preset name, got 3"),
    ],
)
def test_a_bad_config_file_is_named(home, text, error, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_config(home / ".config" / "mgpt4" / "config.yaml", text)
    with pytest.raises(ConfigError, match=error):
        default_model()
    assert not (tmp_path / "pwned").exists()
