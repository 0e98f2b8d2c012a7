"""Resuming eval runs: SIGKILL mid-run then every item answered exactly once, limits that grow, a torn
last line, and a rerun with other settings refused instead of mixed in. Also ``compare``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers.eval_runs import SHORT, read_answers

from mgpt4.config import GenerateConfig
from mgpt4.errors import UsageError
from mgpt4.eval.compare import compare
from mgpt4.eval.config import EvalConfig
from mgpt4.eval.pipeline import run_eval
from mgpt4.model.minigpt4 import Generation

ROOT = Path(__file__).resolve().parents[2]

KILLED_RUN = """
import sys, torch
torch.set_num_threads(1)
from mgpt4.config import GenerateConfig
from mgpt4.eval.config import EvalConfig
from mgpt4.eval.pipeline import run_eval
cfg = EvalConfig(task="shapes", checkpoint=sys.argv[1], out=sys.argv[2], limit=30, batch_size=3, device="cpu",
                 generate=GenerateConfig(max_new_tokens=16))
run_eval(cfg)
"""


@pytest.mark.slow  # a subprocess imports torch and loads the model: ~10-20 s on 2 busy cores
def test_sigkill_mid_run_then_rerun_answers_every_item_exactly_once(
    micro_model, micro_model_dir, tmp_path, monkeypatch
):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(
        [sys.executable, "-c", KILLED_RUN, micro_model_dir, str(out)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    answers = out / "answers.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if answers.is_file() and answers.read_text().count("\n") >= 3:
            break
        time.sleep(0.01)
    assert process.poll() is None, process.stderr.read().decode()[-2000:]
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / "scores.json").exists()
    before = [json.loads(line) for line in answers.read_text().splitlines()]
    assert 3 <= len(before) < 30
    with open(answers, "a") as handle:
        handle.write('{"id": "test-0000')  # a record torn by the kill: must be cut, not crash the rerun

    generated = []
    real_generate = micro_model.generate
    monkeypatch.setattr(
        micro_model, "generate", lambda *a, **k: generated.append(len(a[0])) or real_generate(*a, **k)
    )
    cfg = EvalConfig(
        task="shapes",
        checkpoint=micro_model_dir,
        out=str(out),
        limit=30,
        batch_size=3,
        device="cpu",
        generate=GenerateConfig(max_new_tokens=16),
    )
    result = run_eval(cfg, model=micro_model)

    assert result.resumed == len(before) and result.answered_now == 30 - len(before) == sum(generated)
    records = read_answers(out)
    assert [r["id"] for r in records] == [f"test-{i:06d}" for i in range(30)]
    assert {r["id"]: r["answer"] for r in records if r["id"] in {b["id"] for b in before}} == {
        b["id"]: b["answer"] for b in before
    }
    assert json.loads((out / "scores.json").read_text())["metrics"]["n"] == 30


def test_a_larger_limit_answers_only_the_new_items(micro_model, tmp_path):
    cfg = EvalConfig(task="shapes", out=str(tmp_path / "out"), limit=3, generate=SHORT)
    first = run_eval(cfg, model=micro_model)
    assert (first.answered_now, first.resumed, first.items) == (3, 0, 3)
    more = run_eval(
        EvalConfig(task="shapes", out=str(tmp_path / "out"), limit=5, generate=SHORT), model=micro_model
    )
    assert (more.answered_now, more.resumed, more.items) == (2, 3, 5)
    fewer = run_eval(cfg, model=micro_model)  # a smaller limit scores the first 3 and keeps the others
    assert (fewer.answered_now, fewer.items) == (0, 3) and len(read_answers(tmp_path / "out")) == 5


def test_rerun_with_other_settings_is_refused(micro_model, tmp_path):
    out = str(tmp_path / "out")
    run_eval(EvalConfig(task="shapes", out=out, limit=2, generate=SHORT), model=micro_model)
    other = EvalConfig(task="shapes", out=out, limit=2, generate=GenerateConfig(max_new_tokens=9))
    with pytest.raises(UsageError, match=r"holds answers made with another generate") as error:
        run_eval(other, model=micro_model)
    assert error.value.exit_code == 2
    with pytest.raises(UsageError, match="another prompt"):
        run_eval(
            EvalConfig(task="shapes", out=out, limit=2, generate=SHORT, prompt="What is it?"),
            model=micro_model,
        )


def scripted(monkeypatch, model, texts):
    answers = iter(texts)
    monkeypatch.setattr(
        model,
        "generate",
        lambda prompts, images, config=None, streamer=None: [
            Generation(next(answers), 1, "") for _ in prompts
        ],
    )


def test_compare_two_runs(micro_model, tmp_path, monkeypatch):
    from mgpt4.data import synthetic
    from mgpt4.eval.tasks.shapes import BUILTIN_SEED

    samples = synthetic.make_samples(4, seed=BUILTIN_SEED, split="test")
    scripted(monkeypatch, micro_model, ["", "", "", ""])
    run_eval(EvalConfig(task="shapes", out=str(tmp_path / "a"), limit=4), model=micro_model)
    texts = [s.detailed for s in samples[:3]] + [""]
    scripted(monkeypatch, micro_model, texts)
    run_eval(EvalConfig(task="shapes", out=str(tmp_path / "b"), limit=4), model=micro_model)

    table = compare(tmp_path / "a", tmp_path / "b")
    rows = {row.metric: row for row in table.rows}
    accuracy = synthetic.score(texts, samples)["accuracy"]
    assert 0.5 < accuracy < 1
    assert (rows["accuracy"].a, rows["accuracy"].b, rows["accuracy"].difference) == (0.0, accuracy, accuracy)
    assert rows["n"].difference == 0 and table.task_a == table.task_b == "shapes" and table.notes == []
    assert json.dumps(table.to_json())  # plain data, ready for --json
    with pytest.raises(UsageError, match="scores.json: not found"):
        compare(tmp_path / "a", tmp_path / "missing")


def test_unreadable_images_are_left_out_then_answered_once_they_exist(micro_model, photo_dir, tmp_path):
    import shutil

    from helpers.eval_runs import write_lines

    images = tmp_path / "images"
    images.mkdir()
    for i in (0, 1):
        shutil.copy(photo_dir / f"img{i}.jpg", images / f"img{i}.jpg")
    (images / "broken.jpg").write_bytes(b"not a jpeg")
    rows = [
        {"image": name, "question": "What is it?", "answer": "a shape"}
        for name in ("img0.jpg", "broken.jpg", "img1.jpg", "img2.jpg")
    ]
    cfg = EvalConfig(
        task="vqa",
        data=str(write_lines(images / "vqa.jsonl", rows)),
        out=str(tmp_path / "out"),
        generate=SHORT,
    )
    result = run_eval(cfg, model=micro_model)
    records = read_answers(tmp_path / "out")
    assert [r["error"] is None for r in records] == [True, False, True, False]
    assert records[1]["error"].startswith("cannot read image") and records[3]["error"] == "no such file"
    assert records[1]["scores"] is None and (result.items, result.errors, result.metrics["n"]) == (2, 2, 2)
    assert any("2 images could not be read" in note for note in result.notes)

    shutil.copy(photo_dir / "img2.jpg", images / "img2.jpg")
    again = run_eval(cfg, model=micro_model)
    assert (again.resumed, again.answered_now, again.items, again.errors) == (2, 2, 3, 1)


def test_eval_config_from_overrides():
    from mgpt4.config import load_config
    from mgpt4.errors import ConfigError

    cfg = load_config(
        EvalConfig,
        None,
        [
            "task=pope",
            "data=p.jsonl",
            "judge.url=http://127.0.0.1:9/v1",
            "limit=5",
            "generate.max_new_tokens=10",
            "prompt_style=chat",
        ],
    )
    assert (cfg.task, cfg.limit, cfg.judge.url, cfg.generate.max_new_tokens) == (
        "pope",
        5,
        "http://127.0.0.1:9/v1",
        10,
    )
    assert cfg.generate.do_sample is False  # greedy by default
    with pytest.raises(
        ConfigError, match="task: 'mme' is not allowed; choose one of captions, pope, vqa, judge"
    ):
        load_config(EvalConfig, None, ["task=mme"])
    with pytest.raises(UsageError, match="limit: must be ≥ 1"):
        load_config(EvalConfig, None, ["limit=0"])
    with pytest.raises(UsageError, match="needs \\{question\\}"):
        run_eval(EvalConfig(task="pope", data="p.jsonl", prompt="Answer yes or no."))
