"""Official files load straight into the compute dtype: checked from headers first, filled per tensor.

Files are written by ``mgpt4.model.synthetic`` in the official formats at the micro shape (EVA .pth in
fp16 with one block more than used, BLIP-2 .pth with its text branch, the projection .pth, a sharded
safetensors Llama folder); the expected values are read back from those files independently.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import load_file

from mgpt4.cli import cli
from mgpt4.config import ModelConfig
from mgpt4.errors import CheckpointError, UsageError
from mgpt4.model import build as build_module
from mgpt4.model.build import build_model
from mgpt4.model.checkpoints import blip2_to_ours
from mgpt4.model.synthetic import write_official_files


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    return write_official_files("micro", tmp_path_factory.mktemp("official"), seed=5, shard_bytes=200_000)


def official_cfg(files: dict[str, Path], **changes) -> ModelConfig:
    values = {
        "preset": "micro",
        "vision_weights": str(files["vision"]),
        "qformer_weights": str(files["qformer"]),
        "proj_weights": str(files["proj"]),
        "llm_path": str(files["llm"]),
        "grad_checkpointing": False,
        "dtype": "bf16",
    }
    return ModelConfig(**(values | changes))


def llm_tensors(folder: Path) -> dict[str, torch.Tensor]:
    state = {}
    for shard in sorted(folder.glob("*.safetensors")):
        state |= load_file(str(shard))
    return state


def test_every_part_arrives_in_the_compute_dtype_with_the_files_values(files):
    model = build_model(official_cfg(files))
    params = dict(model.named_parameters())
    assert {p.dtype for p in params.values()} == {torch.bfloat16}
    assert not any(p.device.type == "meta" for p in params.values())

    vision = torch.load(files["vision"], weights_only=True)
    depth = model.preset.vision.depth
    assert any(k.startswith(f"blocks.{depth}.") for k in vision)  # the unused 40th block is in the file
    for key, value in model.visual_encoder.state_dict().items():
        torch.testing.assert_close(value, vision[key].to(torch.bfloat16), msg=key)
    # EVA's fixed zero k-bias is no file tensor: it must still be zero after the meta-device build.
    assert all(not block.attn.k_bias.any() for block in model.visual_encoder.blocks)

    blip2 = torch.load(files["qformer"], weights_only=True)["model"]
    ours = model.state_dict()
    used = [k for k in blip2 if blip2_to_ours(k) in ours]
    assert len(used) == len(model.Qformer.state_dict()) + 3  # + query_tokens, ln_vision weight/bias
    for key in used:
        torch.testing.assert_close(ours[blip2_to_ours(key)], blip2[key].to(torch.bfloat16), msg=key)

    proj = torch.load(files["proj"], weights_only=True)["model"]
    torch.testing.assert_close(model.llama_proj.weight, proj["llama_proj.weight"].to(torch.bfloat16))
    for key, value in llm_tensors(files["llm"]).items():
        torch.testing.assert_close(model.llama_model.state_dict()[key], value, msg=key)


def test_tower_equals_the_fp32_build_cast_afterwards(files):
    """Casting per tensor while loading computes what the old path (fp32 build, cast at the end) did."""
    bf16 = build_model(official_cfg(files)).eval()
    cast = build_model(official_cfg(files, dtype="fp32")).eval().to(torch.bfloat16)
    images = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(bf16.encode_images(images), cast.encode_images(images), atol=0, rtol=0)


def test_trainable_parameters_can_be_fp32_master_weights(files):
    model = build_model(official_cfg(files, trainable=["proj", "qformer"]), trainable_dtype=torch.float32)
    dtypes = {name.split(".")[0]: p.dtype for name, p in model.named_parameters()}
    assert dtypes["llama_proj"] == dtypes["Qformer"] == dtypes["query_tokens"] == torch.float32
    assert dtypes["visual_encoder"] == dtypes["llama_model"] == torch.bfloat16


# --------------------------------------------------------------------------------------------------
# every file is checked before anything big is allocated
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def no_big_allocation(monkeypatch):
    """Fail the test if the LLM load or a file-filled part's fill starts."""

    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before every file was checked")

    monkeypatch.setattr(build_module, "load_llm", refuse)
    monkeypatch.setattr(build_module.checkpoints, "fill", refuse)


def _copy_llm(files: dict[str, Path], tmp_path: Path) -> Path:
    folder = tmp_path / "llm"
    shutil.copytree(files["llm"], folder)
    return folder


def test_missing_or_truncated_shard_is_one_error_before_loading(files, tmp_path, no_big_allocation):
    folder = _copy_llm(files, tmp_path)
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()
    with pytest.raises(
        CheckpointError, match=rf"{shards[-1].name}: shard named in model.safetensors.index.json"
    ):
        build_model(official_cfg(files, llm_path=str(folder)))
    shards[0].write_bytes(shards[0].read_bytes()[:1000])
    shutil.copy(files["llm"] / shards[-1].name, shards[-1])
    with pytest.raises(CheckpointError, match=rf"{shards[0].name}: not a readable safetensors file"):
        build_model(official_cfg(files, llm_path=str(folder)))


def test_wrong_files_are_named_before_loading(files, tmp_path, no_big_allocation):
    with pytest.raises(CheckpointError, match=r"nope\.pth: weight file not found"):
        build_model(official_cfg(files, vision_weights=str(tmp_path / "nope.pth")))
    # The BLIP-2 file given as the vision file: every key unexpected.
    with pytest.raises(CheckpointError, match=r"blip2_pretrained_flant5xxl\.pth: \d+ unexpected key"):
        build_model(official_cfg(files, vision_weights=str(files["qformer"])))
    state = torch.load(files["qformer"], weights_only=True)
    del state["model"]["Qformer.bert.encoder.layer.1.output_query.dense.weight"]
    torch.save(state, tmp_path / "blip2.pth")
    with pytest.raises(CheckpointError, match=r"blip2\.pth: missing 1 key.*layer\.1\.output_query\.dense"):
        build_model(official_cfg(files, qformer_weights=str(tmp_path / "blip2.pth")))
    folder = _copy_llm(files, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"intermediate_size": 64}))
    with pytest.raises(CheckpointError, match=r"mlp\.\w+_proj\.weight' has shape .* config\.json implies"):
        build_model(official_cfg(files, llm_path=str(folder)))


def test_llm_of_another_width_than_the_official_preset_is_a_usage_error(files, no_big_allocation):
    with pytest.raises(
        UsageError, match=r"config\.json: hidden_size 128, but the preset's projection needs 4096"
    ):
        build_model(official_cfg(files, preset="vicuna-7b"))


# --------------------------------------------------------------------------------------------------
# pickle LLM folders (issue 13 item 7): weights-only, and a pickle that runs code is refused
# --------------------------------------------------------------------------------------------------


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _bin_llm(files: dict[str, Path], tmp_path: Path) -> Path:
    """The LLM folder as an old transformers saved it: one pytorch_model.bin (plus a rotary buffer)."""
    folder = _copy_llm(files, tmp_path)
    state = llm_tensors(folder)
    for path in [*folder.glob("model*.safetensors"), folder / "model.safetensors.index.json"]:
        path.unlink()
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    torch.save(state, folder / "pytorch_model.bin")
    return folder


def test_pickle_only_llm_loads_weights_only(files, tmp_path):
    folder = _bin_llm(files, tmp_path)
    model = build_model(official_cfg(files, llm_path=str(folder)))
    for key, value in llm_tensors(files["llm"]).items():
        torch.testing.assert_close(model.llama_model.state_dict()[key], value, msg=key)


def test_pickle_llm_that_runs_code_is_refused_in_one_line(files, tmp_path):
    folder = _bin_llm(files, tmp_path)
    marker = tmp_path / "pwned"
    state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    state["lm_head.weight"] = _RunsCode(marker)
    with open(folder / "pytorch_model.bin", "wb") as handle:
        pickle.dump(state, handle)  # the legacy (non-zip) format, which cannot be memory-mapped
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: a legacy .*pickle.*safetensors"):
        build_model(official_cfg(files, llm_path=str(folder)))
    torch.save(state, folder / "pytorch_model.bin")  # zip format, with the payload inside
    image = tmp_path / "photo.png"
    Image.new("RGB", (64, 64), "red").save(image)
    result = CliRunner().invoke(
        cli, ["describe", "-m", "micro", "--llm", str(folder), str(image)], catch_exceptions=False
    )
    assert result.exit_code == 1
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: ") and "pytorch_model.bin: refused to load" in line, line
    assert not marker.exists()
