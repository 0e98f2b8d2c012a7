"""`mgpt4 demo --quick`: every stage through the real code paths, with a score far above chance."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mgpt4.data import synthetic

MGPT4 = [sys.executable, "-m", "mgpt4"]


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
    # The issue's --quick bar: mean attribute accuracy >= 0.8 (measured 0.88 on the 2-core machine:
    # shape 0.72, colour 0.99, position 0.82, count 1.00), and every attribute at least twice chance
    # (shape 1/4, colour 1/6, position 1/9, count 1/2).
    assert score["accuracy"] >= 0.8, score
    for attribute, chance in (("shape", 1 / 4), ("colour", 1 / 6), ("position", 1 / 9), ("count", 1 / 2)):
        assert score[attribute] >= min(2 * chance, 0.9), (attribute, score)
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
