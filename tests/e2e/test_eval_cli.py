"""`mgpt4 eval` and `mgpt4 eval compare` as a user runs them, on the random micro model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from mgpt4.cli import cli
from mgpt4.data import synthetic

pytest.importorskip("pycocoevalcap", reason="the eval extra is not installed: pip install 'mgpt4[eval]'")

SHAPE_METRICS = {"accuracy", "shape", "colour", "position", "count", "correct", "exact", "parsed", "n"}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # micro model: threads only add overhead, a lot on a shared CPU
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory) -> Path:
    """Six test-split shape images in the demo's layout (``captions.jsonl`` + ``KEY.jpg``)."""
    folder = tmp_path_factory.mktemp("shapes")
    synthetic.write_image_folder(synthetic.make_samples(6, seed=2, split="test"), folder)
    return folder


def invoke(*args, code: int = 0):
    result = CliRunner().invoke(cli, ["eval", *map(str, args)])
    assert result.exit_code == code, result.output
    return result


def answers(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]


def test_shapes_eval_scores_resumes_and_shows_a_table(micro_model_dir, shapes_dir, tmp_path):
    out = tmp_path / "shapes"
    args = [
        "-m",
        micro_model_dir,
        "shapes",
        shapes_dir,
        "--out",
        out,
        "--limit",
        4,
        "-b",
        3,
        "--max-new-tokens",
        8,
    ]
    summary = json.loads(invoke(*args, "--json").stdout)
    assert summary["task"] == "shapes" and summary["items"] == 4 and summary["answered_now"] == 4
    assert set(summary["metrics"]) == SHAPE_METRICS and summary["metrics"]["n"] == 4
    assert 0 <= summary["metrics"]["accuracy"] <= 1
    rows = answers(out)
    assert len(rows) == 4 and all(0 < r["tokens"] <= 8 for r in rows)
    saved = json.loads((out / "scores.json").read_text())
    assert saved["metrics"] == summary["metrics"] and saved["settings"]["limit"] == 4
    assert (out / "report.html").read_text().count('class="card') == 4

    again = invoke(*args)  # the table, and nothing answered twice
    assert "eval shapes" in again.stdout and "accuracy" in again.stdout
    assert "0 answered now, 4 from an earlier run" in again.stdout
    assert len(answers(out)) == 4


def test_captions_eval_on_a_coco_file(micro_model_dir, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    samples = synthetic.make_samples(3, seed=4)
    for sample in samples:
        sample.image.save(images / f"{sample.key}.jpg", quality=90)
    coco = {
        "images": [{"id": i, "file_name": f"{s.key}.jpg"} for i, s in enumerate(samples)],
        "annotations": [{"image_id": i, "caption": s.caption} for i, s in enumerate(samples)],
    }
    data = tmp_path / "captions.json"
    data.write_text(json.dumps(coco))
    out = tmp_path / "captions"
    summary = json.loads(
        invoke(
            "-m",
            micro_model_dir,
            "captions",
            data,
            "--images",
            images,
            "--out",
            out,
            "--no-meteor",
            "--max-new-tokens",
            6,
            "--json",
        ).stdout
    )
    metrics = summary["metrics"]
    assert {"bleu_1", "bleu_4", "cider_d", "rouge_l"} <= set(metrics) and metrics["n"] == 3
    assert metrics["meteor"] is None and all(0 <= metrics[k] <= 1 for k in ("bleu_1", "rouge_l"))
    assert [r["reference"] for r in answers(out)] == [[s.caption] for s in samples]


def test_malformed_data_exits_2_naming_the_file_and_line(micro_model_dir, tmp_path):
    pope = tmp_path / "pope.jsonl"
    pope.write_text(
        '{"question_id": 1, "image": "a.jpg", "text": "Is there a cat?", "label": "yes"}\n{oops\n'
    )
    result = invoke("-m", micro_model_dir, "pope", pope, "--out", tmp_path / "out", code=2)
    assert f"error: {pope}:2:" in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "out" / "answers.jsonl").exists()
    unknown = invoke("-m", micro_model_dir, "cats", pope, code=2)
    assert "unknown task 'cats'; choose one of captions, pope, vqa, judge, shapes" in unknown.stderr


def test_compare_shows_both_runs_and_the_difference(micro_model_dir, shapes_dir, tmp_path):
    for name, tokens in (("a", 4), ("b", 12)):
        invoke(
            "-m",
            micro_model_dir,
            "shapes",
            shapes_dir,
            "--out",
            tmp_path / name,
            "--limit",
            3,
            "--max-new-tokens",
            tokens,
            "--quiet",
        )
    comparison = json.loads(invoke("compare", tmp_path / "a", tmp_path / "b", "--json").stdout)
    rows = {row["metric"]: row for row in comparison["rows"]}
    assert set(rows) == SHAPE_METRICS
    scores = {name: json.loads((tmp_path / name / "scores.json").read_text())["metrics"] for name in "ab"}
    for metric, row in rows.items():
        assert (row["a"], row["b"]) == (scores["a"][metric], scores["b"][metric])
        assert row["difference"] == pytest.approx(row["b"] - row["a"])
    assert "different generate" in comparison["notes"]

    table = CliRunner().invoke(
        cli, ["eval", "compare", str(tmp_path / "a"), str(tmp_path / "b")], terminal_width=200
    )
    assert table.exit_code == 0, table.output
    accuracy = rows["accuracy"]
    line = next(line for line in table.stdout.splitlines() if " accuracy " in line)
    assert (
        f"{accuracy['a']:.4f}" in line
        and f"{accuracy['b']:.4f}" in line
        and f"{accuracy['difference']:+.4f}" in line
    )
    assert "note: different generate" in table.stdout
    missing = invoke("compare", tmp_path / "a", tmp_path / "nowhere", code=2)
    assert "scores.json: not found" in missing.stderr
