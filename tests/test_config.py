"""Recipes + dotted overrides → typed configs; bad keys and types are one-line errors."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from mgpt4.config import GenerateConfig, ModelConfig, field, load_config, save_config
from mgpt4.errors import ConfigError


@dataclasses.dataclass
class _Train:
    lr: float = field(1e-4, doc="learning rate")
    steps: int = field(10, doc="optimizer steps")
    sources: list[str] = field(default_factory=list, doc="inputs")


@dataclasses.dataclass
class _Run:
    model: ModelConfig = field(default_factory=ModelConfig, doc="model")
    train: _Train = field(default_factory=_Train, doc="training")
    generate: GenerateConfig = field(default_factory=GenerateConfig, doc="decoding")
    out: str | None = field(None, doc="output folder")


def test_recipe_then_overrides_with_coercion(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("# mgpt4 pretrain --config r.yaml\ntrain:\n  lr: 3.0e-4\nmodel:\n  preset: vicuna-7b\n")
    cfg = load_config(
        _Run,
        recipe,
        [
            "train.steps=20",
            "train.lr=1e-5",
            "model.trainable=[proj,qformer]",
            "generate.do_sample=true",
            "out=runs/x",
            "train.sources=a.tar",
        ],
    )
    assert cfg.model.preset == "vicuna-7b" and cfg.train.steps == 20 and cfg.train.lr == 1e-5
    assert cfg.model.trainable == ["proj", "qformer"] and cfg.generate.do_sample is True
    assert cfg.out == "runs/x" and cfg.train.sources == ["a.tar"]


def test_unknown_key_names_nearest(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.lrr': did you mean 'train\.lr'"):
        load_config(_Run, None, ["train.lrr=1"])
    with pytest.raises(ConfigError, match=r"unknown config key 'modle'.*did you mean 'model'"):
        load_config(_Run, None, ["modle.preset=micro"])


def test_wrong_types_name_the_key():
    with pytest.raises(ConfigError, match=r"train\.steps: expected an integer, got 'many'"):
        load_config(_Run, None, ["train.steps=many"])
    with pytest.raises(ConfigError, match=r"generate\.do_sample: expected true or false"):
        load_config(_Run, None, ["generate.do_sample=maybe"])
    with pytest.raises(ConfigError, match=r"override 'nonsense' is not key=value"):
        load_config(_Run, None, ["nonsense"])


def test_missing_recipe_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match=r"recipe nope\.yaml: no such file"):
        load_config(_Run, "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: not valid YAML"):
        load_config(_Run, bad)


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(_Run, None, ["train.lr=2e-5", "model.llm_path=/models/vicuna"])
    path = save_config(cfg, tmp_path / "config.yaml", header="mgpt4 pretrain")
    assert path.read_text().startswith("# mgpt4 pretrain\n")
    again = load_config(_Run, path)
    assert again == cfg
    assert yaml.safe_load(path.read_text())["model"]["llm_path"] == "/models/vicuna"
def test_yaml12_booleans_keep_words_like_no_as_strings():
    from mgpt4.config import parse_yaml

    assert parse_yaml("no") == "no" and parse_yaml("off") == "off"
    assert parse_yaml("true") is True and parse_yaml("[yes, false]") == ["yes", False]
