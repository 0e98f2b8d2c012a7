"""Flags generated from config fields, the one precedence rule, and choices checked at load (exit 2)."""

from __future__ import annotations

from pathlib import Path

import click
import pytest
import yaml
from click.testing import CliRunner
from PIL import Image

from mgpt4.cli import COMMANDS, cli
from mgpt4.cli.options import FieldOption, field_info, split_args
from mgpt4.config import load_config
from mgpt4.errors import ConfigError
from mgpt4.train.config import TrainRunConfig


def all_commands() -> list[tuple[str, click.Command]]:
    found = []

    def walk(name: str, command: click.Command) -> None:
        found.append((name, command))
        for sub_name, sub in getattr(command, "commands", {}).items():
            walk(f"{name} {sub_name}", sub)

    for name, command in COMMANDS.items():
        walk(name, command)
    return found


def test_every_generated_flag_shows_its_field_doc_and_default():
    generated = 0
    for name, command in all_commands():
        for param in command.params:
            if not isinstance(param, FieldOption):
                continue
            generated += 1
            field, _, default = field_info(param.config_class, param.key)
            assert param.help.startswith(field.metadata["doc"]), (name, param.key)
            if isinstance(default, bool):
                assert f"={str(not default).lower()}" in param.help, (name, param.key)
            elif default is not None:
                assert f"default: {default}" in param.help, (name, param.key)
    assert generated > 60  # download, train, curate, describe, chat, demo …


def test_help_shows_the_dataclass_default():
    """Nothing restates a default by hand: the help is built from the dataclass."""
    from mgpt4.infer.config import DescribeConfig

    field, _, default = field_info(DescribeConfig, "batch_size")
    assert default == 8
    result = CliRunner().invoke(cli, ["describe", "--help"], terminal_width=200)
    assert "images per generate call (left padding, per-row stop)  [batch_size; default: 8]" in result.output


def test_boolean_fields_become_switches_that_flip_the_default():
    help_text = CliRunner().invoke(cli, ["chat", "--help"], terminal_width=200).output
    assert "--greedy" in help_text and "[sets generate.do_sample=false]" in help_text
    assert "--no-stream" in help_text and "[sets stream=false]" in help_text
    describe_help = CliRunner().invoke(cli, ["describe", "--help"], terminal_width=200).output
    assert "--sample" in describe_help and "[sets generate.do_sample=true]" in describe_help
    assert "--dtype [auto|fp32|bf16|fp16]" in describe_help  # a Literal field is a choice


def test_split_args_keeps_existing_paths_as_inputs(tmp_path):
    odd = tmp_path / "a=b.jpg"
    odd.write_bytes(b"")
    assert split_args(["x.jpg", "generate.seed=3", str(odd), "not a key=1"]) == (
        ["x.jpg", str(odd), "not a key=1"],
        ["generate.seed=3"],
    )


# --------------------------------------------------------------------------------------------------
# precedence: recipe < KEY=VALUE < flag, in two commands that save their resolved config
# --------------------------------------------------------------------------------------------------


def test_download_precedence_recipe_then_key_value_then_flag(tmp_path):
    urls = tmp_path / "urls.txt"
    urls.write_text("http://127.0.0.1:9/nothing.jpg\n")  # port 9: refused at once, the row just fails
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("threads: 3\nshard_size: 50\nprocesses: 1\n")

    def saved(out: str, *args: str) -> dict:
        result = CliRunner().invoke(cli, ["download", str(urls), "-c", str(recipe), "-o", out, "-q", *args])
        assert result.exit_code == 0, result.output
        return yaml.safe_load((Path(out) / "download_config.yaml").read_text())

    only_recipe = saved(str(tmp_path / "a"))
    assert (only_recipe["threads"], only_recipe["shard_size"]) == (3, 50)
    key_value = saved(str(tmp_path / "b"), "threads=5")
    assert (key_value["threads"], key_value["shard_size"]) == (5, 50)
    flag = saved(str(tmp_path / "c"), "threads=5", "--threads", "7", "output=ignored-by-the-flag")
    assert (flag["threads"], flag["shard_size"]) == (7, 50)
    assert flag["output"] == str(tmp_path / "c") and not Path("ignored-by-the-flag").exists()


def test_curate_precedence_recipe_then_key_value_then_flag(micro_model_dir, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (32, 32), "red").save(images / "red.jpg")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("num: 1\nbatch_size: 4\nfixer:\n  backend: none\ngenerate:\n  max_new_tokens: 5\n")
    base = ["curate", "-c", str(recipe), "--model", micro_model_dir, "--images", str(images), "-q"]

    def saved(out: Path, *args: str) -> dict:
        result = CliRunner().invoke(cli, [*base, "--out", str(out), *args])
        assert result.exit_code == 0, result.output
        return yaml.safe_load((out / "curate.yaml").read_text())

    assert saved(tmp_path / "a")["generate"]["max_new_tokens"] == 5
    assert saved(tmp_path / "b", "generate.max_new_tokens=4")["generate"]["max_new_tokens"] == 4
    both = saved(tmp_path / "c", "generate.max_new_tokens=4", "batch_size=2", "--max-new-tokens", "3")
    assert both["generate"]["max_new_tokens"] == 3 and both["batch_size"] == 2 and both["num"] == 1


# --------------------------------------------------------------------------------------------------
# choice-like strings fail at load, before anything starts
# --------------------------------------------------------------------------------------------------


def test_unknown_precision_exits_2_before_any_process_starts_or_file_is_written(tmp_path):
    run = tmp_path / "run"
    shards = tmp_path / "shards"
    shards.mkdir()
    result = CliRunner().invoke(cli, [
        "pretrain", "--config", "micro_stage1", f"data.shards=[{{path: {shards}}}]", f"out={run}",
        "train.precision=fp8",
    ])  # fmt: skip
    assert result.exit_code == 2, result.output
    assert (
        "error: train.precision: 'fp8' is not allowed; choose one of auto, fp32, bf16, fp16" in result.stderr
    )
    assert not run.exists()
    result = CliRunner().invoke(
        cli, ["pretrain", "--config", "micro_stage1", f"out={run}", "train.zero=zero4"]
    )
    assert result.exit_code == 2 and "train.zero: 'zero4' is not one of zero1, zero2, zero3" in result.stderr
    assert not run.exists()


@pytest.mark.parametrize(
    ("key", "allowed"),
    [
        ("model.dtype=fp64", "auto, fp32, bf16, fp16"),
        ("model.attn_implementation=flash", "sdpa, eager, flash_attention_2"),
        ("model.quantize=int4", "none, int8, nf4"),
    ],
)
def test_model_choices_are_checked_at_load(key, allowed):
    with pytest.raises(ConfigError, match=f"is not allowed; choose one of {allowed}"):
        load_config(TrainRunConfig, None, [key])


def test_describe_refuses_an_unknown_dtype_flag_and_key(micro_model_dir, tmp_path):
    image = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(image)
    flag = CliRunner().invoke(cli, ["describe", "-m", micro_model_dir, str(image), "--dtype", "fp64"])
    assert flag.exit_code == 2 and "'fp64' is not one of 'auto', 'fp32', 'bf16', 'fp16'" in flag.output
    key = CliRunner().invoke(cli, ["describe", "-m", micro_model_dir, str(image), "model.dtype=fp64"])
    assert key.exit_code == 2 and "model.dtype: 'fp64' is not allowed" in key.stderr
    assert not key.stdout  # refused before any output
