"""Every shipped training recipe and ZeRO config loads, validates and turns into a DeepSpeed config."""

from __future__ import annotations

import json

import pytest

from mgpt4.config import builtin_recipes, from_dict, load_config, parse_yaml, read_recipe
from mgpt4.errors import ConfigError, UsageError
from mgpt4.train.config import TrainRunConfig
from mgpt4.train.engine import deepspeed_config

TRAIN_RECIPES = ["stage1_pretrain", "stage2_finetune", "micro_stage1", "micro_stage2",
                 "micro_foundation_stage1", "micro_foundation_stage2"]  # fmt: skip
ZERO_RECIPES = ["zero1", "zero2", "zero3", "zero2_offload"]


@pytest.mark.parametrize("name", TRAIN_RECIPES)
def test_training_recipes_load_and_validate(name):
    path = builtin_recipes()[name]
    command = "pretrain" if "1" in name else "finetune"
    assert path.read_text().startswith(f"# mgpt4 {command} --config {name}")
    cfg = load_config(TrainRunConfig, name)
    cfg.validate()
    assert cfg.stage == (1 if command == "pretrain" else 2)
    if name == "micro_stage1":  # a fresh micro model: everything trains
        assert set(cfg.model.trainable) == {"proj", "qformer", "vision", "llm"}
    elif name == "micro_stage2":  # stage 2 keeps the ViT stage 1 trained
        assert set(cfg.model.trainable) == {"proj", "llm"}
    elif name.startswith("micro_foundation"):  # the shipped pretrained micro ViT and LLM stay frozen
        assert cfg.model.trainable == ["proj"]
        assert cfg.model.vision_weights.startswith("mgpt4:") and cfg.model.llm_path.startswith("mgpt4:")
    else:
        assert cfg.model.trainable == ["proj"] and cfg.model.grad_checkpointing


def test_official_numbers_are_in_the_recipes():
    s1, s2 = load_config(TrainRunConfig, "stage1_pretrain"), load_config(TrainRunConfig, "stage2_finetune")
    o1, o2 = s1.optim, s2.optim
    assert (o1.lr, o1.min_lr, o1.warmup_lr) == (1e-4, 8e-5, 1e-6)
    assert (o1.warmup_steps, o1.iters_per_epoch) == (5000, 5000)
    assert (s1.train.max_steps, s1.data.micro_batch_size, s1.model.max_txt_len) == (20000, 64, 32)
    assert [(s.path, s.ratio) for s in s1.data.shards] == [("laion/", 115), ("cc_sbu/", 14)]
    assert (o2.lr, o2.min_lr, o2.warmup_lr) == (3e-5, 1e-5, 1e-6)
    assert (o2.warmup_steps, o2.iters_per_epoch) == (200, 200)
    assert (s2.train.max_steps, s2.data.micro_batch_size, s2.model.max_txt_len) == (1000, 12, 160)
    for cfg in (s1, s2):
        optim = cfg.optim
        assert (optim.weight_decay, optim.beta1, optim.beta2, cfg.train.seed) == (0.05, 0.9, 0.999, 42)


@pytest.mark.parametrize("zero", ZERO_RECIPES)
def test_zero_recipes_become_deepspeed_configs(zero):
    json.loads(builtin_recipes()[zero].read_text())
    overrides = [f"train.zero={zero}", "train.gradient_accumulation_steps=2"]
    cfg = load_config(TrainRunConfig, "micro_stage1", overrides)
    ds = deepspeed_config(cfg, world_size=2)
    assert ds["zero_optimization"]["stage"] == int(zero[4])
    assert ds["train_batch_size"] == 32 * 2 * 2 and ds["gradient_accumulation_steps"] == 2
    assert ds["optimizer"]["params"]["torch_adam"] is True  # this CPU machine: FusedAdam needs CUDA
    assert ds["optimizer"]["params"]["betas"] == [0.9, 0.999]


@pytest.mark.parametrize("precision, key", [("bf16", "bf16"), ("fp16", "fp16"), ("fp32", None)])
def test_precision_switches(precision, key):
    ds = deepspeed_config(load_config(TrainRunConfig, "micro_stage1", [f"train.precision={precision}"]), 1)
    assert {k for k in ("bf16", "fp16") if k in ds} == ({key} if key else set())


def test_bad_values_are_config_errors():
    with pytest.raises(ConfigError, match="train.precision"):
        deepspeed_config(load_config(TrainRunConfig, "micro_stage1", ["train.precision=fp8"]), 1)
    with pytest.raises(ConfigError, match="data.micro_batch_size"):
        load_config(TrainRunConfig, "micro_stage1", ["data.micro_batch_size=0"]).validate()


def test_paths_are_checked_before_training(tmp_path):
    cfg = load_config(TrainRunConfig, "micro_stage1", [f"data.shards=[{{path: {tmp_path}/none}}]"])
    with pytest.raises(UsageError, match="no shards found"):
        cfg.check_paths()
    cfg = load_config(TrainRunConfig, "micro_stage2", [f"data.aligned={tmp_path}"])
    with pytest.raises(UsageError, match="filter_cap.json"):
        cfg.check_paths()


def test_tensorboard_without_its_package_is_a_usage_error(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec

    def find_spec(name, *args):
        return None if name == "tensorboard" else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    aligned = tmp_path / "aligned"
    aligned.mkdir()
    (aligned / "filter_cap.json").write_text('{"annotations": []}')
    cfg = load_config(TrainRunConfig, "micro_stage2", [f"data.aligned={aligned}", "train.tensorboard=true"])
    with pytest.raises(UsageError, match="train.tensorboard: needs the tensorboard package"):
        cfg.check_paths()


def test_the_commented_eval_example_of_micro_stage2_is_a_valid_section():
    text = builtin_recipes()["micro_stage2"].read_text()
    example = text[text.index("# eval:") :].splitlines()
    section = parse_yaml("\n".join(line.removeprefix("# ") for line in example if line.startswith("# ")))
    cfg = from_dict(TrainRunConfig, {**read_recipe("micro_stage2"), **section})
    assert cfg.eval.task == "shapes" and cfg.eval.limit == 50
    assert load_config(TrainRunConfig, "micro_stage2").eval.task is None  # off unless asked for
