"""The official-files path through the CLI, at the micro shape: official-format files on disk →
``model import`` folder → ``describe -m FOLDER``; stage 1 on a frozen nf4-quantized LLM → describe."""

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
from mgpt4.model.build import load_model_dir
from mgpt4.model.importer import import_model
from mgpt4.model.synthetic import write_official_files
from tests.helpers.train_data import write_shape_shards

DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    return write_official_files("micro", tmp_path_factory.mktemp("official"), seed=21)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("images")
    paths = [folder / f"{colour}.png" for colour in ("red", "navy", "white")]
    for path in paths:
        Image.new("RGB", (64, 64), path.stem).save(path)
    return paths


@pytest.fixture(scope="module", autouse=True)
def _clean_process_state():
    """One intra-op thread; no rendezvous variables left behind by the in-process training run."""
    saved = {name: os.environ.get(name) for name in DIST_ENV}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def answers(stdout: str) -> list[tuple[str, str]]:
    return [(Path(row["image"]).name, row["text"]) for row in map(json.loads, stdout.splitlines())]


def test_imported_folder_describes_like_the_five_flags(files, images, tmp_path):
    flags = ["-m", "micro", "--vision", files["vision"], "--qformer", files["qformer"],
             "--proj", files["proj"], "--llm", files["llm"]]  # fmt: skip
    decoding = ["--max-new-tokens", "6", "--json", "--quiet", *images]
    direct = invoke("describe", *flags, *decoding)
    assert direct.exit_code == 0, direct.stderr

    folder = import_model(
        "micro", files["vision"], files["qformer"], files["proj"], files["llm"], tmp_path / "m"
    )
    imported = invoke("describe", "-m", folder, *decoding)
    assert imported.exit_code == 0, imported.stderr
    assert answers(imported.stdout) == answers(direct.stdout)
    assert len(answers(direct.stdout)) == len(images)


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="the [quant] extra is absent")
def test_stage1_trains_the_projection_on_a_quantized_frozen_llm(files, images, tmp_path):
    shards = write_shape_shards(tmp_path / "shards", 16)
    run = tmp_path / "run"
    result = invoke(
        "pretrain", "--config", "micro_stage1", f"data.shards=[{{path: {shards}}}]", f"out={run}",
        "model.preset=micro", "model.trainable=[proj]", "model.grad_checkpointing=true",
        f"model.vision_weights={files['vision']}", f"model.qformer_weights={files['qformer']}",
        f"model.proj_weights={files['proj']}", f"model.llm_path={files['llm']}", "model.quantize=nf4",
        "data.micro_batch_size=4", "train.max_steps=3", "train.log_every=1", "train.save_every=3",
        "train.plot=false", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))

    trained = load_model_dir(run, quantize="nf4")
    assert type(trained.llama_model.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    initial = torch.load(files["proj"], weights_only=True)["model"]["llama_proj.weight"]
    assert not torch.equal(trained.llama_proj.weight, initial)  # gradients reached it through 4-bit layers

    described = invoke(
        "describe", "-m", run, "model.quantize=nf4", "--max-new-tokens", "4", "--json", images[0]
    )
    assert described.exit_code == 0, described.stderr
    assert len(answers(described.stdout)) == 1
