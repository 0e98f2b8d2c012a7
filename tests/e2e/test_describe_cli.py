"""`mgpt4 describe` through the CLI on a micro model: batching, JSONL, inputs, failures, flags."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from rich.console import Console

from mgpt4.cli import cli
from mgpt4.config import ModelConfig
from mgpt4.conversation import ALIGNMENT_INSTRUCTIONS, stage2_prompt
from mgpt4.data.synthetic import make_samples
from mgpt4.model.build import build_model, save_model_dir
from tests.helpers.bad_images import write_bad_files, write_damaged_shards


@pytest.fixture(autouse=True)
def _one_thread():
    # A micro model gains nothing from intra-op threads, and loses a lot when the CPU is shared.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sharp_model_dir(tmp_path_factory) -> str:
    """A random micro model whose answers depend on the image (a scaled-up projection)."""
    torch.manual_seed(1234)
    cfg = ModelConfig(preset="micro", grad_checkpointing=False)
    model = build_model(cfg)
    with torch.no_grad():
        model.llama_proj.weight.mul_(40)
    return str(save_model_dir(model, cfg, tmp_path_factory.mktemp("sharp")))


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    """Six images, two in a subfolder: extreme ones, so that a random model's answers differ."""
    folder = tmp_path_factory.mktemp("images")
    (folder / "nested").mkdir()
    noise = np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    pictures = [Image.new("RGB", (64, 64), c) for c in ("black", "white", "red")] + [
        Image.fromarray(n) for n in noise
    ]
    for index, picture in enumerate(pictures):
        picture.save(folder / ("nested" if index >= 4 else ".") / f"image{index}.png")
    return folder


def describe(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, ["describe", *args], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_batched_output_equals_one_at_a_time(sharp_model_dir, image_dir):
    runs = {}
    for batch_size in ("1", "4"):
        code, out, err = describe(
            "-m", sharp_model_dir, str(image_dir), "--json", "-b", batch_size, "--max-new-tokens", "12"
        )
        assert code == 0, err
        runs[batch_size] = jsonl(out)
    assert [r["image"] for r in runs["1"]] == [r["image"] for r in runs["4"]]
    assert [r["text"] for r in runs["1"]] == [r["text"] for r in runs["4"]]
    assert [r["tokens"] for r in runs["1"]] == [r["tokens"] for r in runs["4"]]
    assert len({r["text"] for r in runs["1"]}) > 1, "answers should depend on the image"
    records = runs["4"]
    assert len(records) == 6 and set(records[0]) == {"image", "prompt", "text", "tokens", "seconds"}
    assert records[-1]["image"].endswith(".png") and "nested" in records[-1]["image"]  # recursive, sorted
    assert records[0]["prompt"] == stage2_prompt(ALIGNMENT_INSTRUCTIONS[0])
    assert all(0 < r["tokens"] <= 12 and r["seconds"] > 0 for r in records)


def test_unreadable_files_are_reported_and_skipped_with_exit_1(micro_model_dir, image_dir, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"definitely not a jpeg")
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    first = sorted(image_dir.glob("*.png"))[0]
    out_file = tmp_path / "out" / "captions.jsonl"
    code, out, err = describe(
        "-m",
        micro_model_dir,
        str(first),
        str(broken),
        str(notes),
        "missing.png",
        "--max-new-tokens",
        "4",
        "-o",
        str(out_file),
        "--json",
    )
    assert code == 1
    assert f"skipped {broken}: cannot read image" in err
    assert f"skipped {notes}: unsupported file type '.txt'" in err
    assert "skipped missing.png: no such file" in err
    assert "3 of 4 input(s) could not be read" in err
    assert [r["image"] for r in jsonl(out)] == [str(first)]
    assert jsonl(out_file.read_text()) == jsonl(out)  # --output gets the same records, atomically
    assert not list(out_file.parent.glob("*.tmp"))


def test_plain_text_when_piped_and_custom_prompt(micro_model_dir, image_dir):
    first, second = sorted(image_dir.glob("*.png"))[:2]
    code, out, _ = describe("-m", micro_model_dir, str(first), "--max-new-tokens", "5")
    assert code == 0 and out.strip() and "==>" not in out and not out.lstrip().startswith("{")
    code, out, _ = describe(
        "-m",
        micro_model_dir,
        str(first),
        str(second),
        "--max-new-tokens",
        "5",
        "--prompt",
        "What colour is the shape?",
        "--json",
    )
    prompts = {r["prompt"] for r in jsonl(out)}
    assert prompts == {"###Human: <Img><ImageHere></Img> What colour is the shape? ###Assistant: "}
    code, out, _ = describe("-m", micro_model_dir, f"{image_dir}/*.png", "--max-new-tokens", "3", "-q")
    assert code == 0 and out.count("==> ") == 4 and f"==> {first} <==" in out


def test_shard_set_input(micro_model_dir, tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    for shard_index in range(2):
        with tarfile.open(shards / f"{shard_index:05d}.tar", "w") as tar:
            for sample in make_samples(2, seed=shard_index, split="train", image_size=64):
                buffer = io.BytesIO()
                sample.image.save(buffer, format="JPEG")
                for ext, data in (
                    ("jpg", buffer.getvalue()),
                    ("json", json.dumps({"caption": "x"}).encode()),
                ):
                    info = tarfile.TarInfo(f"{shard_index}{sample.key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    for spec in (str(shards), str(shards / "{00000..00001}.tar")):
        code, out, err = describe("-m", micro_model_dir, spec, "--json", "--max-new-tokens", "3", "-b", "3")
        assert code == 0, err
        names = [r["image"] for r in jsonl(out)]
        assert len(names) == 4 and names[0].startswith(str(shards / "00000.tar")) and "#" in names[0]


def test_rich_panels_on_a_terminal(micro_model_dir, image_dir, monkeypatch):
    buffer = io.StringIO()
    terminal = Console(file=buffer, force_terminal=True, width=100, highlight=False)
    monkeypatch.setattr("mgpt4.cli.infer.console", terminal)
    first = sorted(image_dir.glob("*.png"))[0]
    code, _, err = describe("-m", micro_model_dir, str(first), "--max-new-tokens", "4")
    assert code == 0, err
    shown = buffer.getvalue()
    assert "╭" in shown and first.name in shown and "tokens" in shown


def test_generation_flags_and_bad_usage(micro_model_dir, image_dir):
    first = str(sorted(image_dir.glob("*.png"))[0])
    sampled = [
        describe(
            "-m",
            micro_model_dir,
            first,
            "--json",
            "--sample",
            "--seed",
            "7",
            "--temperature",
            "1.5",
            "--top-p",
            "0.8",
            "--max-new-tokens",
            "6",
        )[1]
        for _ in range(2)
    ]
    assert jsonl(sampled[0])[0]["text"] == jsonl(sampled[1])[0]["text"]  # seeded sampling repeats
    code, out, err = describe(
        "-m",
        micro_model_dir,
        first,
        "--json",
        "--num-beams",
        "2",
        "--repetition-penalty",
        "1.0",
        "--device",
        "cpu",
        "--dtype",
        "fp32",
        "generate.max_new_tokens=3",
    )
    assert code == 0, err
    assert jsonl(out)[0]["tokens"] <= 3
    assert describe(first)[0] == 2  # no --model
    code, _, err = describe("-m", "no-such-run", first)
    assert code == 2 and "no-such-run" in err
    assert describe("-m", micro_model_dir, "--batch-size", "0", first)[0] == 2
    code, _, err = describe("-m", micro_model_dir, first, "generate.max_new_token=3")
    assert code == 2 and "max_new_tokens" in err
    code, _, err = describe("-m", micro_model_dir, first, "--vision", "eva.pth")
    assert code == 2 and "--vision" in err


def test_recipe_file_and_overrides(micro_model_dir, image_dir, tmp_path):
    recipe = tmp_path / "describe.yaml"
    recipe.write_text(
        f"# mgpt4 describe -c describe.yaml IMAGES\ncheckpoint: {micro_model_dir}\nbatch_size: 2\n"
        "json: true\n"
        "generate:\n  max_new_tokens: 3\n"
    )
    code, out, err = describe("-c", str(recipe), str(image_dir), "generate.max_new_tokens=2")
    assert code == 0, err
    records = jsonl(out)
    assert len(records) == 6 and all(r["tokens"] <= 2 for r in records)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_every_bad_image_or_shard_is_one_line_and_the_rest_is_described(micro_model_dir, tmp_path):
    files = write_bad_files(tmp_path / "in")
    shards = write_damaged_shards(tmp_path / "shards")
    inputs = [files[name] for name in ("good", "bomb", "middle_bomb", "empty", "text", "truncated", "folder")]
    code, out, err = describe(
        "-m", micro_model_dir, *map(str, inputs), f"{tmp_path}/nothing/*.png", str(shards),
        "--json", "--max-new-tokens", "2", "-b", "3",
    )  # fmt: skip
    assert code == 1
    tars = {index: shards / f"{index:05d}.tar" for index in range(4)}
    assert [r["image"] for r in jsonl(out)] == [str(files["good"])] + [
        f"{tars[0]}#a0",
        f"{tars[0]}#a1",
        f"{tars[1]}#b0",
        f"{tars[1]}#b3",
        f"{tars[2]}#c0",
    ]
    limit = "> the 89,478,485-pixel limit"
    for line in (
        f"skipped {files['bomb']}: cannot read image (400,000,000 pixels {limit}",
        f"skipped {files['middle_bomb']}: cannot read image (10000x10000 = 100,000,000 pixels {limit}",
        f"skipped {files['empty']}: cannot read image (not an image file",
        f"skipped {files['text']}: cannot read image (not an image file",
        f"skipped {files['truncated']}: cannot read image (",
        f"skipped {files['folder']}: a folder without image files or .tar shards",
        f"skipped {tmp_path}/nothing/*.png: no such file",
        f"skipped {tars[1]}#b1: cannot read image (not an image file",
        f"skipped {tars[1]}#b2: cannot read image (400,000,000 pixels {limit}",
        f"skipped {tars[2]}#c1: c1.jpg: unexpected end of data",
        f"skipped {tars[2]}: truncated shard",
        f"skipped {tars[3]}: unreadable shard",
        "12 of 18 input(s) could not be read (listed above); 6 described",
    ):
        assert line in err, line


def test_bad_settings_and_output_paths_fail_in_one_line_before_the_model_loads(micro_model_dir, tmp_path):
    image = tmp_path / "red.png"
    Image.new("RGB", (32, 32), "red").save(image)
    for args, message in [
        (["--max-new-tokens", "-5"], "generate.max_new_tokens: must be at least 1, got -5"),
        (["--num-beams", "0"], "generate.num_beams: must be at least 1"),
        (["--temperature", "0", "--sample"], "generate.temperature: must be above 0"),
        (["--top-p", "1.5"], "generate.top_p: must be in (0, 1], got 1.5"),
        (["--top-p", "0"], "generate.top_p: must be in (0, 1], got 0.0"),
        (["--repetition-penalty", "-1"], "generate.repetition_penalty: must be above 0"),
        (["generate.max_length=0"], "generate.max_length: must be at least 1"),
        (["generate.temperature=.nan"], "generate.temperature: must be a finite number"),
        (["-o", str(tmp_path)], f"--output {tmp_path}: is a folder"),
        (["-o", f"{image}/out.jsonl"], f"--output {image}/out.jsonl: cannot write there (a part of the path"),
    ]:
        code, out, err = describe("-m", micro_model_dir, str(image), *args)
        assert code == 2 and f"error: {message}" in err, (args, err)
        assert not out and "loaded" not in err  # refused before any work


def test_a_checkpoint_config_with_a_python_tag_is_refused_and_never_run(micro_model_dir, tmp_path):
    evil = tmp_path / "evil"
    shutil.copytree(micro_model_dir, evil)
    marker = tmp_path / "pwned"
    (evil / "config.yaml").write_text(f'model: !!python/object/apply:os.system ["touch {marker}"]\n')
    code, _, err = describe("-m", str(evil), str(tmp_path / "x.png"))
    assert code == 2 and f"error: {evil / 'config.yaml'}: not valid YAML (line 1, column 8: " in err
    assert "python/object/apply:os.system" in err and not marker.exists()
    (evil / "config.yaml").write_bytes(b"model:\n  preset: micro\xff\n")
    code, _, err = describe("-m", str(evil), str(tmp_path / "x.png"))
    assert code == 2 and f"{evil / 'config.yaml'}: cannot read (not UTF-8 text" in err
