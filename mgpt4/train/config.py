"""``TrainRunConfig``: the typed config of ``mgpt4 pretrain`` and ``mgpt4 finetune``.

One config for both stages; ``stage`` decides the data (shard mixture vs aligned set) and the text
format (caption + "\\n" vs instruction template + answer + "###"). Official values live in the recipes
``stage1_pretrain.yaml`` / ``stage2_finetune.yaml`` (sources: shared/OFFICIAL.md §8).
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path
from typing import Literal

from mgpt4.config import ModelConfig, field
from mgpt4.errors import ConfigError, UsageError
from mgpt4.model.presets import get_preset

# The DeepSpeed configs shipped in mgpt4/recipes (train.zero may also name a JSON file of one's own).
ZERO_RECIPES = ("zero1", "zero2", "zero3", "zero2_offload")


@dataclasses.dataclass
class ShardSet:
    """One stage-1 data source and its sampling ratio."""

    path: str = field("", doc="shard folder, glob or brace pattern ({00000..00099}.tar)")
    ratio: float = field(1.0, doc="relative sampling weight (official laion 115 : cc_sbu 14)")


@dataclasses.dataclass
class DataConfig:
    """Where training samples come from."""

    shards: list[ShardSet] = field(default_factory=list, doc="stage 1: shard sets mixed by ratio")
    aligned: str | None = field(None, doc="stage 2: a cc_sbu_align-format folder (filter_cap.json + image/)")
    micro_batch_size: int = field(64, doc="samples per process per forward (official 64 stage 1, 12 stage 2)")


@dataclasses.dataclass
class OptimConfig:
    """AdamW and the warmup + cosine schedule (MG runner_base.py, optims.py)."""

    lr: float = field(1e-4, doc="peak learning rate (init_lr)")
    min_lr: float = field(8e-5, doc="cosine floor")
    warmup_lr: float = field(1e-6, doc="learning rate at step 0 of warmup")
    warmup_steps: int = field(5000, doc="linear warmup steps")
    iters_per_epoch: int = field(5000, doc="steps per epoch (warmup restarts its step count per epoch)")
    weight_decay: float = field(0.05, doc="AdamW decay on weights with ndim >= 2 (not biases/norms)")
    beta1: float = field(0.9, doc="AdamW beta1")
    beta2: float = field(0.999, doc="AdamW beta2")
    grad_clip: float = field(0.0, doc="gradient-norm clip (0 = off, as officially)")


@dataclasses.dataclass
class TrainConfig:
    """Loop length, precision, parallelism, logging and checkpoints."""

    max_steps: int = field(20000, doc="optimizer steps in total (official stage 1: 4 x 5000)")
    gradient_accumulation_steps: int = field(1, doc="micro batches per optimizer step")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = field(
        "auto", doc="auto (bf16 on CUDA, fp32 on CPU), fp32, bf16, fp16"
    )
    zero: str = field("zero2", doc="DeepSpeed ZeRO recipe: zero1, zero2, zero3, zero2_offload or a JSON path")

    def validate(self) -> None:
        """``zero`` names a built-in ZeRO recipe or a ``.json`` file (``check_paths`` checks it exists)."""
        if self.zero not in ZERO_RECIPES and not self.zero.endswith(".json"):
            raise ConfigError(
                f"train.zero: '{self.zero}' is not one of {', '.join(ZERO_RECIPES)} or a path to a .json file"
            )

    seed: int = field(42, doc="random seed (model init, data order, instruction draws)")
    log_every: int = field(10, doc="write a metrics.jsonl line every N steps")
    save_every: int = field(1000, doc="checkpoint every N steps (and at the end)")
    keep_last: int = field(3, doc="checkpoints kept; older step-N folders are deleted")
    tensorboard: bool = field(False, doc="also log to RUN/tensorboard (needs the tensorboard package)")
    plot: bool = field(True, doc="write RUN/loss.png at the end")


@dataclasses.dataclass
class TrainRunConfig:
    """``mgpt4 pretrain`` / ``mgpt4 finetune``."""

    stage: int = field(1, doc="1 = caption pretraining on shards, 2 = instruction finetuning on aligned data")
    out: str = field("runs/stage1", doc="run directory: config.yaml, metrics.jsonl, checkpoints/")
    init: str | None = field(None, doc="start from a run's or checkpoint's weights (stage 2: a stage-1 run)")
    model: ModelConfig = field(default_factory=ModelConfig, doc="the model")
    data: DataConfig = field(default_factory=DataConfig, doc="training data")
    optim: OptimConfig = field(default_factory=OptimConfig, doc="optimizer and schedule")
    train: TrainConfig = field(default_factory=TrainConfig, doc="loop settings")

    def validate(self) -> None:
        """Cheap checks that must fail before any process starts (exit code 2)."""
        if self.stage not in (1, 2):
            raise ConfigError(f"stage: must be 1 or 2, got {self.stage}")
        for key, value in (
            ("data.micro_batch_size", self.data.micro_batch_size),
            ("train.max_steps", self.train.max_steps),
            ("train.gradient_accumulation_steps", self.train.gradient_accumulation_steps),
            ("train.log_every", self.train.log_every),
            ("train.save_every", self.train.save_every),
            ("train.keep_last", self.train.keep_last),
            ("optim.iters_per_epoch", self.optim.iters_per_epoch),
        ):
            if value < 1:
                raise ConfigError(f"{key}: must be at least 1, got {value}")

    def check_paths(self) -> None:
        """Data and init paths exist and the preset is known (raises ``UsageError`` naming the key)."""
        try:
            get_preset(self.model.preset)
        except UsageError as exc:
            raise UsageError(f"model.preset: {exc}") from exc
        if self.stage == 1:
            if not self.data.shards:
                raise UsageError("data.shards: stage 1 needs a shard set (data.shards=[{path: ...}])")
            from mgpt4.data.shards import find_shards

            for index, shard_set in enumerate(self.data.shards):
                if shard_set.ratio <= 0:
                    raise UsageError(f"data.shards[{index}].ratio: must be > 0, got {shard_set.ratio}")
                find_shards(shard_set.path)
        else:
            if not self.data.aligned:
                raise UsageError("data.aligned: stage 2 needs an aligned folder (filter_cap.json + image/)")
            if not (Path(self.data.aligned) / "filter_cap.json").is_file():
                raise UsageError(f"data.aligned: {self.data.aligned}/filter_cap.json not found")
        if self.init is not None:
            from mgpt4.model.build import read_model_config, resolve_model_dir

            init_preset = read_model_config(resolve_model_dir(self.init)).preset
            if init_preset != self.model.preset:
                raise UsageError(
                    f"init: {self.init} holds a {init_preset} model but model.preset is {self.model.preset}; "
                    f"set model.preset={init_preset}"
                )
        if self.train.zero.endswith(".json") and not Path(self.train.zero).is_file():
            raise UsageError(f"train.zero: {self.train.zero}: no such file")
        if self.train.tensorboard and importlib.util.find_spec("tensorboard") is None:
            raise UsageError("train.tensorboard: needs the tensorboard package (pip install tensorboard)")
