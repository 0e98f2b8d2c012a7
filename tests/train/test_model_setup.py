"""Each training rank builds its model in the training precision: frozen parts in bf16/fp16 (never an fp32
copy), trainable ones fp32 for DeepSpeed's master weights; with fp32 precision (the CPU default) all fp32."""

from __future__ import annotations

import pytest
import torch

from mgpt4.config import load_config
from mgpt4.errors import ConfigError
from mgpt4.model.synthetic import write_official_files
from mgpt4.train import engine
from mgpt4.train.config import TrainRunConfig


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_official_files("micro", tmp_path_factory.mktemp("official"), seed=4)


def run_config(files, precision: str) -> TrainRunConfig:
    return load_config(
        TrainRunConfig,
        "micro_stage1",
        [
            "model.preset=micro", "model.trainable=[proj, qformer]", f"train.precision={precision}",
            f"model.vision_weights={files['vision']}", f"model.qformer_weights={files['qformer']}",
            f"model.llm_path={files['llm']}",
        ],
    )  # fmt: skip


def dtypes_by_part(model) -> dict[str, set[torch.dtype]]:
    parts: dict[str, set[torch.dtype]] = {}
    for name, param in model.named_parameters():
        parts.setdefault(name.split(".")[0], set()).add(param.dtype)
    return parts


def test_frozen_parts_in_the_precision_and_trainable_ones_fp32(files):
    model = engine._setup_model(run_config(files, "bf16"))
    parts = dtypes_by_part(model)
    assert parts["visual_encoder"] == parts["llama_model"] == parts["ln_vision"] == {torch.bfloat16}
    assert parts["llama_proj"] == parts["Qformer"] == parts["query_tokens"] == {torch.float32}
    assert model.training


def test_fp32_precision_keeps_everything_fp32(files):
    model = engine._setup_model(run_config(files, "fp32"))
    assert {dtype for dtypes in dtypes_by_part(model).values() for dtype in dtypes} == {torch.float32}


def test_unknown_precision_is_a_config_error():
    with pytest.raises(ConfigError, match=r"train\.precision: 'bf8' is not one of auto, fp32, bf16, fp16"):
        engine.resolve_precision("bf8")
    if not torch.cuda.is_available():
        assert engine.resolve_precision("auto") == "fp32"
