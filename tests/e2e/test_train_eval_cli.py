"""`mgpt4 finetune … eval.task=shapes eval.data=…`: an eval of the final checkpoint, written into the run.

The eval's settings and data are checked before training (exit 2 at once); after the last checkpoint the
eval runs into RUN/eval/TASK, its metrics go into metrics.jsonl and the summary; a rerun resumes it (or
finds it done); a failed eval is one line naming the saved checkpoint and how to rerun it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers.train_cli import clean_process_state, invoke, metrics
from helpers.train_data import write_shape_aligned

from mgpt4.config import load_config
from mgpt4.data import synthetic
from mgpt4.train import manifest
from mgpt4.train.config import TrainRunConfig

EVAL_IMAGES = 6
_clean_process_state = pytest.fixture(scope="module", autouse=True)(clean_process_state)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("finetune_eval")
    shapes = root / "shapes"
    synthetic.write_image_folder(synthetic.make_samples(EVAL_IMAGES, seed=1, split="test"), shapes)
    return {"aligned": write_shape_aligned(root / "aligned", 8), "shapes": shapes}


def finetune_args(data: dict[str, Path], run: Path, *extra: str) -> list[str]:
    return [
        "finetune", "--config", "micro_stage2", f"data.aligned={data['aligned']}", f"out={run}",
        "data.micro_batch_size=4", "train.max_steps=2", "train.save_every=2", "train.log_every=1",
        "train.plot=false", "eval.task=shapes", f"eval.data={data['shapes']}", "eval.batch_size=4",
        "eval.generate.max_new_tokens=8", *extra,
    ]  # fmt: skip


def read_answers(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]


def error_line(result) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    return line


def test_finetune_ends_with_an_eval_of_its_final_checkpoint_and_a_rerun_resumes_it(data, tmp_path):
    run = tmp_path / "run"
    result = invoke(*finetune_args(data, run), "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    out = run / "eval" / "shapes"
    scores = json.loads((out / "scores.json").read_text())
    final = run / "checkpoints" / "step-2"
    assert scores["model"] == {"checkpoint": str(final.resolve())}
    # The scores are those of the answers given: recomputed from answers.jsonl, they agree.
    answers = read_answers(out)
    samples = synthetic.read_image_folder(data["shapes"])
    assert [a["id"] for a in answers] == [s.key for s in samples]
    assert all(a["answer"] is not None and a["tokens"] <= 8 for a in answers)
    assert scores["metrics"] == synthetic.score([a["answer"] for a in answers], samples)
    assert scores["metrics"]["n"] == EVAL_IMAGES
    assert summary["eval"] == {"shapes": scores["metrics"]} and summary["eval_out"] == str(out)
    lines = metrics(run)
    assert [m["step"] for m in lines] == [1, 2, 2] and "loss" in lines[1]
    assert lines[-1] == {"step": 2, "eval": {"shapes": scores["metrics"]}}
    assert invoke("plot", run).exit_code == 0  # the eval line is no loss point
    assert load_config(TrainRunConfig, run / "config.yaml").eval.task == "shapes"

    # Rerun of the finished run: nothing trains, the eval finds every answer done, nothing is logged twice.
    before = (out / "answers.jsonl").read_bytes()
    result = invoke(*finetune_args(data, run), "--json")
    assert result.exit_code == 0, result.stderr
    again = json.loads(result.stdout)
    assert again["already_finished"] and again["eval"] == summary["eval"]
    assert (out / "answers.jsonl").read_bytes() == before
    assert metrics(run) == lines
    shown = invoke(*finetune_args(data, run))  # the same, as a person reads it
    assert shown.exit_code == 0, shown.stderr
    text = " ".join(shown.stdout.split())  # rich wraps long lines at the terminal's width
    assert "eval shapes: " in text and f", n {summary['eval']['shapes']['n']} → {out}" in text

    # Extended by a step: the new final checkpoint is evaluated, the old eval is kept aside.
    result = invoke(*finetune_args(data, run, "train.max_steps=3", "train.save_every=3"), "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["resumed_from"] == 2
    assert json.loads((out / "scores.json").read_text())["model"]["checkpoint"].endswith("step-3")
    assert read_answers(run / "eval" / "shapes.step-2") == answers
    assert [(m["step"], "eval" in m) for m in metrics(run)] == [(1, False), (2, False), (2, True), (3, False),
                                                                (3, True)]  # fmt: skip


def test_a_failed_eval_is_one_line_naming_the_saved_checkpoint_and_the_rerun(data, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "eval").write_text("a file where the eval folder goes")  # the eval cannot write its output
    result = invoke(*finetune_args(data, run, "eval.limit=3"))
    assert result.exit_code == 1, result.stderr
    line = error_line(result)
    final = run / "checkpoints" / "step-2"
    assert f"eval shapes of {final} failed: " in line and "The checkpoint is saved" in line
    assert f"mgpt4 eval -m {final} shapes {data['shapes']} --out {run / 'eval' / 'shapes'}" in line
    assert "limit=3" in line and "batch_size=4" in line and "generate.max_new_tokens=8" in line
    assert manifest.verify(final)["step"] == 2
    assert [m["step"] for m in metrics(run)] == [1, 2]

    (run / "eval").unlink()
    # Run again (eval settings may change between reruns: they are not part of the checkpoints).
    result = invoke(*finetune_args(data, run, "eval.limit=4"), "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["already_finished"] and summary["eval"]["shapes"]["n"] == 4
    assert metrics(run)[-1] == {"step": 2, "eval": summary["eval"]}


def _malformed(data: dict[str, Path], tmp_path: Path) -> Path:
    folder = tmp_path / "broken_shapes"
    shutil.copytree(data["shapes"], folder)
    index = folder / "captions.jsonl"
    rows = index.read_text().splitlines()
    index.write_text("\n".join([rows[0], rows[1][:-7], *rows[2:]]) + "\n")  # line 2 cut short
    return folder


EARLY_ERRORS = {
    "missing-data": (["eval.data=/no/such/shapes"], ["eval.data: /no/such/shapes: no such file"]),
    "malformed-data": (["eval.data={broken}"], ["eval.data: ", "captions.jsonl:2: not valid JSON"]),
    "bad-batch-size": (["eval.batch_size=0"], ["eval.batch_size: must be ≥ 1"]),
    "unknown-task": (["eval.task=shape"], ["eval.task", "'shape'", "shapes"]),
    "bad-generate": (["eval.generate.max_new_tokens=0"], ["generate.max_new_tokens"]),
    "no-cuda": (["eval.device=cuda"], ["eval.device: cuda: no CUDA GPU"]),
}


@pytest.mark.parametrize(("overrides", "named"), list(EARLY_ERRORS.values()), ids=list(EARLY_ERRORS))
def test_eval_settings_and_data_are_checked_before_training(overrides, named, data, tmp_path):
    if "eval.device=cuda" in overrides and torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    run = tmp_path / "run"
    overrides = [o.replace("{broken}", str(_malformed(data, tmp_path))) for o in overrides]
    result = invoke(*finetune_args(data, run, *overrides))
    assert result.exit_code == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: ") and all(word in line for word in named), line
    assert not run.exists()  # nothing trained, nothing written
