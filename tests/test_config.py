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


def test_every_generation_setting_is_validated_at_load():
    for override, message in [
        ("generate.max_new_tokens=0", r"generate\.max_new_tokens: must be at least 1, got 0"),
        ("generate.num_beams=0", r"generate\.num_beams: must be at least 1"),
        ("generate.max_length=0", r"generate\.max_length: must be at least 1"),
        ("generate.temperature=0", r"generate\.temperature: must be above 0 \(for greedy decoding"),
        ("generate.temperature=.inf", r"generate\.temperature: must be a finite number"),
        ("generate.top_p=0", r"generate\.top_p: must be in \(0, 1\], got 0\.0"),
        ("generate.top_p=1.01", r"generate\.top_p: must be in \(0, 1\]"),
        ("generate.repetition_penalty=0", r"generate\.repetition_penalty: must be above 0"),
        ("generate.seed=18446744073709551616", r"generate\.seed: must be within torch\.manual_seed's range"),
        ("generate.stop=['###', '']", r"generate\.stop: every stop string must be non-empty"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(_Run, None, [override])
    edge = load_config(_Run, None, ["generate.top_p=1", "generate.stop=[]", "generate.seed=-1"])
    assert edge.generate.top_p == 1.0 and edge.generate.stop == [] and edge.generate.seed == -1


def test_yaml_files_fail_in_one_line_naming_the_file(tmp_path):
    from mgpt4.config import parse_yaml, read_yaml_file

    recipe = tmp_path / "tagged.yaml"
    marker = tmp_path / "ran"
    recipe.write_text(f'train: !!python/object/apply:os.system ["touch {marker}"]\n')
    with pytest.raises(
        ConfigError, match=r"tagged\.yaml: not valid YAML \(line 1, column 8: could not determine"
    ):
        load_config(_Run, recipe)
    assert not marker.exists()
    for data, message in [
        (b"train:\n  lr: 1e-4\xff\n", r"latin\.yaml: cannot read \(not UTF-8 text"),
        (b"- 1\n- 2\n", r"latin\.yaml: expected a mapping of keys to values, got list"),
    ]:
        (tmp_path / "latin.yaml").write_bytes(data)
        with pytest.raises(ConfigError, match=message):
            read_yaml_file(tmp_path / "latin.yaml")
    (tmp_path / "empty.yaml").write_text("# nothing yet\n")
    assert read_yaml_file(tmp_path / "empty.yaml") == {}
    with pytest.raises(ConfigError, match=r"^/set top_p: not valid YAML \(line 1, column 2: "):
        parse_yaml("[", source="/set top_p")
    with pytest.raises(yaml.YAMLError):
        parse_yaml("[")  # without a source the caller handles it
