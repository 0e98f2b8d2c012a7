"""`mgpt4 model import`, the default model (`$MGPT4_MODEL`, `mgpt4 config set model`) and `--quantize`,
from official-format files on disk, as a user runs them."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from mgpt4.cli import cli
from mgpt4.model.synthetic import write_official_files


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    return write_official_files("micro", tmp_path_factory.mktemp("official"), seed=33)


@pytest.fixture(scope="module")
def imported(files, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("models") / "minigpt4-micro"
    result = invoke(
        "model",
        "import",
        "--preset",
        "micro",
        "--vision",
        files["vision"],
        "--qformer",
        files["qformer"],
        "--proj",
        files["proj"],
        "--llm",
        files["llm"],
        "-o",
        out,
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(out) and "mgpt4 config set model" in result.stderr
    return out


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("img") / "red.png"
    Image.new("RGB", (48, 48), "red").save(path)
    return path


def invoke(*args, env: dict | None = None, input: str | None = None):  # noqa: A002 - CliRunner's name
    return CliRunner().invoke(cli, [str(a) for a in args], env=env, input=input)


def describe(*args, env: dict | None = None) -> tuple[int, list[dict], str]:
    result = invoke("describe", *args, "--json", "--max-new-tokens", 5, env=env)
    lines = [json.loads(line) for line in result.stdout.splitlines()] if result.exit_code == 0 else []
    return result.exit_code, lines, result.stderr


def texts(lines: list[dict]) -> list[tuple[str, str]]:
    return [(r["image"], r["text"]) for r in lines]


def test_import_writes_a_folder_that_describes_like_the_official_files(files, imported, image):
    assert sorted(p.name for p in imported.iterdir()) == [
        "config.yaml",
        "llm",
        "qformer.safetensors",
        "trainable.safetensors",
        "vision.safetensors",
    ]
    direct = describe(
        "-m",
        "micro",
        "--vision",
        files["vision"],
        "--qformer",
        files["qformer"],
        "--proj",
        files["proj"],
        "--llm",
        files["llm"],
        image,
    )
    from_folder = describe("-m", imported, image)
    assert direct[0] == from_folder[0] == 0, direct[2] + from_folder[2]
    assert [r["text"] for r in direct[1]] == [r["text"] for r in from_folder[1]]


def test_import_refuses_missing_flags_and_a_used_folder(files, imported):
    result = invoke("model", "import", "--preset", "micro", "--vision", files["vision"])
    assert result.exit_code == 2 and "model import: give --proj, --llm, --out" in result.stderr
    again = invoke(
        "model",
        "import",
        "--preset",
        "micro",
        "--vision",
        files["vision"],
        "--qformer",
        files["qformer"],
        "--proj",
        files["proj"],
        "--llm",
        files["llm"],
        "-o",
        imported,
    )
    assert again.exit_code == 2 and "already exists and is not empty" in again.stderr


def test_the_default_model_from_the_environment_then_the_user_config(imported, image, tmp_path):
    code, expected, err = describe("-m", imported, image)
    assert code == 0, err
    xdg = tmp_path / "xdg"

    # Neither set: one line saying exactly how to set one.
    code, _, err = describe(image, env={"XDG_CONFIG_HOME": str(xdg)})
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "mgpt4 config set model FOLDER" in err and "export MGPT4_MODEL=FOLDER" in err
    assert str(xdg / "mgpt4" / "config.yaml") in err

    # $MGPT4_MODEL.
    code, lines, err = describe(image, env={"XDG_CONFIG_HOME": str(xdg), "MGPT4_MODEL": str(imported)})
    assert code == 0 and texts(lines) == texts(expected), err

    # `mgpt4 config set model`: a relative folder is stored absolute.
    env = {"XDG_CONFIG_HOME": str(xdg)}
    shown = invoke("config", "show", "--json", env=env)
    assert json.loads(shown.stdout)["model"] is None
    result = invoke("config", "set", "model", os.path.relpath(imported), env=env)
    assert result.exit_code == 0, result.output
    settings = json.loads(invoke("config", "show", "--json", env=env).stdout)
    assert settings == {
        "file": str(xdg / "mgpt4" / "config.yaml"),
        "settings": {"model": str(imported)},
        "model": str(imported),
        "model_from": str(xdg / "mgpt4" / "config.yaml"),
    }
    assert "default model: " + str(imported) in invoke("config", "show", env=env).stdout
    code, lines, err = describe(image, env=env)
    assert code == 0 and texts(lines) == texts(expected), err
    piped = invoke("chat", image, "--greedy", "--max-new-tokens", 4, "--json", env=env, input="hello?\n")
    assert piped.exit_code == 0 and json.loads(piped.stdout)["question"] == "hello?", piped.output

    # The environment wins over the file; a bad value is refused before it is written.
    code, _, err = describe(image, env={**env, "MGPT4_MODEL": "no-such-model"})
    assert code == 2 and "no-such-model" in err
    bad = invoke("config", "set", "model", tmp_path / "nowhere", env=env)
    assert bad.exit_code == 2 and "not a folder or a preset" in bad.stderr
    assert invoke("config", "set", "colour", "blue", env=env).exit_code == 2
    assert json.loads(invoke("config", "show", "--json", env=env).stdout)["model"] == str(imported)


def test_eval_and_curate_use_the_default_model_too(imported, image, tmp_path):
    env = {"MGPT4_MODEL": str(imported)}
    folder = image.parent
    result = invoke(
        "curate",
        "--images",
        folder,
        "--out",
        tmp_path / "aligned",
        "--num",
        1,
        "--max-new-tokens",
        3,
        "--fixer",
        "none",
        "--json",
        env=env,
    )
    assert result.exit_code == 0 and json.loads(result.stdout)["images"] == 1, result.output
    import yaml

    assert yaml.safe_load((tmp_path / "aligned" / "curate.yaml").read_text())["model_source"] == str(imported)
    data = tmp_path / "shapes"
    from mgpt4.data import synthetic

    synthetic.write_image_folder(synthetic.make_samples(2, seed=1, split="test"), data)
    result = invoke(
        "eval", "shapes", data, "--out", tmp_path / "eval", "--max-new-tokens", 3, "--json", env=env
    )
    assert result.exit_code == 0 and json.loads(result.stdout)["items"] == 2, result.output


def test_quantize_flag(imported, image):
    bad = invoke("describe", "-m", imported, image, "--quantize", "int4")
    assert bad.exit_code == 2 and "'int4' is not one of 'none', 'int8', 'nf4'" in bad.output
    if importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("the [quant] extra is absent")
    code, lines, err = describe("-m", imported, image, "--quantize", "nf4")
    assert code == 0 and len(lines) == 1 and lines[0]["tokens"] <= 5, err
