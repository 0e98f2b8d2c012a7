"""`mgpt4 demo`: every stage through the real code paths; --quick scores >= 0.9 on every attribute."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from mgpt4.data import synthetic

MGPT4 = [sys.executable, "-m", "mgpt4"]
DEMO_README = Path(__file__).resolve().parents[2] / "bench" / "demo_readme.py"


@pytest.mark.slow
def test_quick_demo_learns_the_shapes(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run([*MGPT4, "demo", "--quick", "--json", "--out", str(out)],
                            capture_output=True, text=True, timeout=900)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    stages = [s["name"] for s in summary["stages"]]
    assert stages == ["download", "pretrain", "curate", "finetune", "describe"]
    score = summary["score"]
    # The issue's --quick bar: every attribute >= 0.9 on the held-out test images.
    for attribute in ("shape", "colour", "position", "count"):
        assert score[attribute] >= 0.9, (attribute, score)
    # Only llama_proj (384 -> 128) trained, in both stages, between the frozen shipped encoders.
    for stage in ("stage1", "stage2"):
        assert summary["parameters"][stage]["trained"] == 384 * 128 + 128, summary["parameters"]
        assert summary["parameters"][stage]["total"] > 900_000
    examples = {(e["model"], e["prompt"]): e["answer"] for e in summary["examples"]}
    assert synthetic.parse_caption(examples[("stage1", "<ImageHere>")]) is not None  # a caption
    chat = "###Human: <Img><ImageHere></Img> Describe this image in detail. ###Assistant: "
    assert examples[("stage2", chat)].startswith("The image shows")  # the chat answer's grammar
    assert ("stage1", chat) in examples
    assert json.loads((out / "score.json").read_text())["score"] == score
    for folder in ("shards", "stage1", "aligned", "stage2"):
        assert (out / folder).is_dir(), folder
    assert (out / "aligned" / "filter_cap.json").is_file() and (out / "stage2" / "loss.png").is_file()

    # The finished run is usable by the inference commands, as the demo's output says.
    image = summary["example_image"]
    described = subprocess.run([*MGPT4, "describe", "--model", str(out / "stage2"), image],
                               capture_output=True, text=True, timeout=300)  # fmt: skip
    assert described.returncode == 0, described.stderr[-2000:]
    assert synthetic.parse_caption(described.stdout) is not None, described.stdout


def test_demo_refuses_to_replace_a_folder_it_did_not_make(tmp_path):
    keep = tmp_path / "mine"
    keep.mkdir()
    (keep / "precious.txt").write_text("do not delete")
    result = subprocess.run([*MGPT4, "demo", "--quick", "--out", str(keep)], capture_output=True, text=True)
    assert result.returncode == 2
    assert "was not made by `mgpt4 demo`" in result.stderr
    assert (keep / "precious.txt").exists()


@pytest.mark.slow
def test_from_scratch_trains_every_module(tmp_path):
    """The comparison mode, at toy sizes: every stage runs and stage 1 trains the whole micro model."""
    out = tmp_path / "scratch"
    sizes = ["train_images=256", "curate_images=16", "test_images=8", "stage1_steps=120", "stage2_steps=2"]
    sizes += ["review=false"]  # 120 steps learn the caption form (curate keeps it), not the facts
    command = [*MGPT4, "demo", "--from-scratch", "--quick", "--json", "--out", str(out), *sizes]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    assert summary["from_scratch"] is True and summary["sizes"]["stage1_steps"] == 120
    stage1 = summary["parameters"]["stage1"]
    assert stage1["trained"] == stage1["total"]  # ViT, ln_vision, projection and LLM all train
    assert summary["parameters"]["stage2"]["trained"] < stage1["trained"]  # the recipe freezes the ViT
    assert (out / "stage2" / "checkpoints").is_dir() and len(summary["examples"]) == 3


def test_readme_demo_block_is_generated_from_the_recorded_runs():
    """`bench/demo_readme.py --check`: README.md shows what bench/results/demo_*.json recorded."""
    result = subprocess.run([sys.executable, str(DEMO_README), "--check"], capture_output=True, text=True,
                            timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    # The block follows the recorded numbers: another score gives another block (so --check can fail).
    spec = importlib.util.spec_from_file_location("demo_readme", DEMO_README)
    demo_readme = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo_readme)
    runs = {name: json.loads((DEMO_README.parent / "results" / f"demo_{name}.json").read_text())
            for name in ("full", "quick")}  # fmt: skip
    block = demo_readme.section(runs["full"], runs["quick"])
    assert block in (DEMO_README.parents[1] / "README.md").read_text()
    assert f"shape {runs['quick']['score']['shape']:.2f}" in block
    runs["quick"]["score"]["shape"] -= 0.5
    assert demo_readme.section(runs["full"], runs["quick"]) != block


def test_readme_eval_block_is_generated_from_recorded_eval_runs(tmp_path):
    """The README's `mgpt4 eval` example is `eval compare` on the recorded stage-1/stage-2 scores.json."""
    spec = importlib.util.spec_from_file_location("demo_readme", DEMO_README)
    demo_readme = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo_readme)
    recorded = DEMO_README.parent / "results" / "eval_demo"
    block = demo_readme.eval_section(recorded)
    assert block in (DEMO_README.parents[1] / "README.md").read_text()
    scores = {
        stage: json.loads((recorded / stage / "scores.json").read_text()) for stage in ("stage1", "stage2")
    }
    assert scores["stage1"]["task"] == scores["stage2"]["task"] == "shapes"
    assert scores["stage1"]["data"]["listing_sha256"] == scores["stage2"]["data"]["listing_sha256"]
    for name in ("shape", "colour", "position", "count"):
        a, b = scores["stage1"]["metrics"][name], scores["stage2"]["metrics"][name]
        assert f"{a:.4f}" in block and f"{b:.4f}" in block and f"{b - a:+.4f}" in block
    # Another recorded score gives another block.
    for stage in ("stage1", "stage2"):
        (tmp_path / stage).mkdir()
        scores[stage]["metrics"]["shape"] -= 0.25 if stage == "stage2" else 0.0
        (tmp_path / stage / "scores.json").write_text(json.dumps(scores[stage]))
    assert demo_readme.eval_section(tmp_path) != block
