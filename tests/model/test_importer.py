"""``import_model``: official files → one safetensors model folder that loads without any pickle."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from mgpt4.config import ModelConfig
from mgpt4.errors import CheckpointError, UsageError
from mgpt4.model.build import build_model, load_model_dir, read_model_config
from mgpt4.model.importer import import_model
from mgpt4.model.synthetic import write_official_files


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    return write_official_files("micro", tmp_path_factory.mktemp("official"), seed=9, shard_bytes=300_000)


@pytest.fixture(scope="module")
def reference(files):
    """The model built straight from the official files."""
    cfg = ModelConfig(
        preset="micro",
        vision_weights=str(files["vision"]),
        qformer_weights=str(files["qformer"]),
        proj_weights=str(files["proj"]),
        llm_path=str(files["llm"]),
        grad_checkpointing=False,
    )
    return build_model(cfg).eval()


def run_import(files: dict[str, Path], out: Path, **changes) -> Path:
    args = {k: files[k] for k in ("vision", "qformer", "proj", "llm")} | changes
    return import_model("micro", args["vision"], args["qformer"], args["proj"], args["llm"], out)


def assert_same_model(model, reference) -> None:
    ours, theirs = model.state_dict(), reference.state_dict()
    assert set(ours) == set(theirs)
    for key, value in theirs.items():
        assert torch.equal(ours[key], value), key


def test_imported_folder_loads_the_same_model_without_reading_a_pickle(
    files, reference, tmp_path, monkeypatch
):
    notes = []
    out = import_model(
        "micro", files["vision"], files["qformer"], files["proj"], files["llm"], tmp_path / "m", notes.append
    )
    assert sorted(p.name for p in out.iterdir()) == [
        "config.yaml", "llm", "qformer.safetensors", "trainable.safetensors", "vision.safetensors",
    ]  # fmt: skip
    assert len(notes) == 4
    cfg = read_model_config(out)
    assert (cfg.vision_weights, cfg.llm_path) == (str(out / "vision.safetensors"), str(out / "llm"))
    # Stored dtypes kept: EVA in fp16 as released; the 40th block left out.
    with safe_open(str(out / "vision.safetensors"), "pt") as vision:
        assert vision.get_tensor("blocks.0.attn.qkv.weight").dtype == torch.float16
        assert not any(k.startswith(f"blocks.{reference.preset.vision.depth}.") for k in vision.keys())
    # Shards are hard links when the file system allows: no second copy of an LLM on disk.
    shard = next(out.glob("llm/model-*.safetensors"))
    assert shard.stat().st_ino == (files["llm"] / shard.name).stat().st_ino

    def no_pickles(*args, **kwargs):
        raise AssertionError("torch.load called while loading an imported folder")

    monkeypatch.setattr(torch, "load", no_pickles)
    moved = shutil.move(out, tmp_path / "moved")  # paths inside are relative to the folder
    assert_same_model(load_model_dir(moved), reference)


def test_pickle_llm_is_resaved_as_safetensors(files, reference, tmp_path):
    llm = tmp_path / "llm_bin"
    shutil.copytree(files["llm"], llm)
    state = {}
    for shard in sorted(llm.glob("model-*.safetensors")):
        with safe_open(str(shard), "pt") as handle:
            state |= {k: handle.get_tensor(k) for k in handle.keys()}
        shard.unlink()
    (llm / "model.safetensors.index.json").unlink()
    torch.save(state, llm / "pytorch_model.bin")
    out = run_import(files, tmp_path / "m", llm=llm)
    assert not list((out / "llm").glob("*.bin"))
    assert list((out / "llm").glob("model-*.safetensors"))
    assert_same_model(load_model_dir(out), reference)


def test_a_wrong_file_writes_nothing(files, tmp_path):
    with pytest.raises(CheckpointError, match=r"eva_vit_g\.pth: \d+ unexpected key"):
        run_import(files, tmp_path / "m", qformer=files["vision"])
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    with pytest.raises(UsageError, match=r"taken: already exists and is not empty"):
        run_import(files, tmp_path / "taken")
    with pytest.raises(UsageError, match=r"preset micro has a Q-Former: give its BLIP-2 file"):
        run_import(files, tmp_path / "m", qformer=None)
