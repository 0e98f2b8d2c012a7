"""Each eval task end to end through ``run_eval`` on the random micro model: real JPEG files, real
tar shards, real scoring, outputs checked against the metrics recomputed from answers.jsonl."""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from pathlib import Path

import pytest
from helpers.eval_runs import SHORT, read_answers, write_lines

from mgpt4.config import GenerateConfig
from mgpt4.data import synthetic
from mgpt4.eval.config import EvalConfig
from mgpt4.eval.metrics.captions import score_captions
from mgpt4.eval.metrics.vqa import exact_match
from mgpt4.eval.metrics.yesno import parse_yes_no, pope_metrics
from mgpt4.eval.pipeline import run_eval
from mgpt4.eval.tasks.shapes import BUILTIN_SEED
from mgpt4.model.minigpt4 import Generation

CAPTIONS = [
    ["A red triangle on a white background.", "A triangle, red, on white."],
    ["Two shapes: a blue square and a star.", "A square and a star on a plain background."],
    ["A green circle in the middle.", "A circle that is green."],
    ["An orange star at the top left.", "A small orange star in the corner."],
]


def coco_file(folder: Path, photo_dir: Path) -> Path:
    data = {
        "images": [{"id": 10 + i, "file_name": f"img{i}.jpg"} for i in range(4)],
        "annotations": [
            {"image_id": 10 + i, "id": 100 + 2 * i + k, "caption": caption}
            for i, pair in enumerate(CAPTIONS)
            for k, caption in enumerate(pair)
        ],
    }
    path = folder / "captions_val.json"
    path.write_text(json.dumps(data))
    return path


def test_captions_from_coco_json_end_to_end(micro_model, photo_dir, tmp_path):
    data = coco_file(tmp_path, photo_dir)
    cfg = EvalConfig(
        task="captions",
        data=str(data),
        images=str(photo_dir),
        out=str(tmp_path / "out"),
        generate=SHORT,
        batch_size=3,
        meteor=False,
    )
    seen = []
    result = run_eval(cfg, progress=lambda done, total: seen.append((done, total)), model=micro_model)

    records = read_answers(tmp_path / "out")
    assert [r["id"] for r in records] == ["10", "11", "12", "13"]
    assert [r["reference"] for r in records] == CAPTIONS
    assert all(r["question"] == "Describe this image in detail." and r["error"] is None for r in records)
    assert seen == [(3, 4), (4, 4)]
    expected = score_captions(
        {r["id"]: r["answer"] for r in records}, {r["id"]: r["reference"] for r in records}, meteor=False
    )
    assert result.metrics == {**expected.corpus, "n": 4}
    assert [r["scores"] for r in records] == [expected.per_item[r["id"]] for r in records]
    scores = json.loads((tmp_path / "out" / "scores.json").read_text())
    assert scores["metrics"] == result.metrics and scores["task"] == "captions"
    assert scores["data"]["sha256"] == {data.name: hashlib.sha256(data.read_bytes()).hexdigest()}
    assert scores["mgpt4_version"] and scores["settings"]["generate"]["max_new_tokens"] == 8
    assert "METEOR not computed (meteor=false)" in scores["notes"]
    report = (tmp_path / "out" / "report.html").read_text()
    ordered = [r["id"] for r in sorted(records, key=lambda r: r["scores"]["cider_d"])]
    positions = [report.index(f'<div class="id">{i} ') for i in ordered]
    assert positions == sorted(positions)  # worst CIDEr-D first
    for src in re.findall(r'<img loading="lazy" src="([^"]+)"', report):
        assert (tmp_path / "out" / src).resolve().is_file()


def test_captions_from_aligned_folder_and_shards(micro_model, photo_dir, tmp_path):
    from mgpt4.data.aligned import write_aligned

    aligned = tmp_path / "aligned"
    write_aligned(aligned, [(f"a{i}", photo_dir / f"img{i}.jpg", CAPTIONS[i][0]) for i in range(3)])
    result = run_eval(
        EvalConfig(
            task="captions", data=str(aligned), out=str(tmp_path / "out1"), generate=SHORT, meteor=False
        ),
        model=micro_model,
    )
    assert result.items == 3
    assert [r["reference"] for r in read_answers(tmp_path / "out1")] == [[CAPTIONS[i][0]] for i in range(3)]

    shards = tmp_path / "shards"
    shards.mkdir()
    with tarfile.open(shards / "00000.tar", "w") as tar:
        for i in range(3):
            for name, payload in (
                (f"s{i}.jpg", (photo_dir / f"img{i}.jpg").read_bytes()),
                (f"s{i}.txt", CAPTIONS[i][1].encode()),
            ):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    out = tmp_path / "out2"
    result = run_eval(
        EvalConfig(task="captions", data=str(shards), out=str(out), generate=SHORT, meteor=False, limit=2),
        model=micro_model,
    )
    records = read_answers(out)
    assert [(r["id"], r["reference"]) for r in records] == [
        ("s0", [CAPTIONS[0][1]]),
        ("s1", [CAPTIONS[1][1]]),
    ]
    assert all((out / r["thumb"]).is_file() for r in records)  # shard images get report thumbnails
    assert result.metrics["n"] == 2


def pope_rows() -> list[dict]:
    objects = ["triangle", "dog", "square", "car", "circle", "star"]
    return [
        {
            "question_id": 100 + i,
            "image": f"img{i % 6}.jpg",
            "text": f"Is there a {obj} in the image?",
            "label": "yes" if i % 2 == 0 else "no",
        }
        for i, obj in enumerate(objects)
    ]


def test_pope_end_to_end(micro_model, photo_dir, tmp_path):
    data = write_lines(photo_dir.parent / f"pope_{tmp_path.name}.jsonl", pope_rows())
    cfg = EvalConfig(
        task="pope",
        data=str(data),
        images=str(photo_dir),
        out=str(tmp_path / "out"),
        generate=SHORT,
        batch_size=4,
    )
    result = run_eval(cfg, model=micro_model)
    records = read_answers(tmp_path / "out")
    assert [r["question"] for r in records] == [
        f"{row['text']}\nAnswer the question using a single word or phrase." for row in pope_rows()
    ]
    parsed = [parse_yes_no(r["answer"]) for r in records]
    assert [r["scores"]["parsed"] for r in records] == parsed
    assert [r["scores"]["correct"] for r in records] == [
        int(p == r["reference"]) for p, r in zip(parsed, records, strict=True)
    ]
    assert result.metrics == {**pope_metrics(parsed, [r["reference"] for r in records]), "n": 6}


def test_vqa_end_to_end(micro_model, photo_dir, tmp_path):
    rows = [
        {
            "question_id": i,
            "image": f"img{i}.jpg",
            "question": f"What shape is number {i}?",
            "answers": [{"answer": "triangle"}, {"answer": "a triangle"}, {"answer": "Triangle."}],
        }
        for i in range(3)
    ]
    rows.append({"image": "img3.jpg", "question": "What colour?", "answer": "orange"})
    data = write_lines(tmp_path / "vqa.jsonl", rows)
    result = run_eval(
        EvalConfig(
            task="vqa", data=str(data), images=str(photo_dir), out=str(tmp_path / "out"), generate=SHORT
        ),
        model=micro_model,
    )
    records = read_answers(tmp_path / "out")
    assert [r["id"] for r in records] == ["0", "1", "2", "4"]  # no question_id: the line number
    assert records[3]["reference"] == ["orange"]
    exact = [int(exact_match(r["answer"], r["reference"])) for r in records]
    assert [r["scores"]["exact"] for r in records] == exact
    assert result.metrics["exact_match"] == sum(exact) / 4
    assert result.metrics["vqa_accuracy"] is None  # one item has a single reference
    assert any("vqa_accuracy left out" in note for note in result.notes)


def test_shapes_builtin_from_a_checkpoint(micro_model_dir, tmp_path):
    out = tmp_path / "out"
    cfg = EvalConfig(
        task="shapes",
        checkpoint=micro_model_dir,
        out=str(out),
        limit=5,
        batch_size=2,
        device="cpu",
        generate=SHORT,
    )
    result = run_eval(cfg)
    records = read_answers(out)
    samples = synthetic.make_samples(5, seed=BUILTIN_SEED, split="test")
    assert [r["id"] for r in records] == [s.key for s in samples]
    assert [r["reference"]["detailed"] for r in records] == [s.detailed for s in samples]
    assert result.metrics == synthetic.score([r["answer"] for r in records], samples)
    assert (out / "shapes-data" / "captions.jsonl").is_file() and result.answered_now == 5


def test_shapes_scores_scripted_answers_as_the_demo_does(micro_model, tmp_path, monkeypatch):
    samples = synthetic.make_samples(4, seed=BUILTIN_SEED, split="test")
    first = samples[2].attributes["shapes"][0]["colour"]
    wrong = next(c for c in synthetic.COLOURS if c != first)
    scripted = [samples[0].detailed, samples[1].caption, samples[2].caption.replace(first, wrong), ""]
    answers = iter(scripted)

    def generate(prompts, images, config=None, streamer=None):
        return [Generation(text=next(answers), tokens=1, raw="") for _ in prompts]

    monkeypatch.setattr(micro_model, "generate", generate)
    result = run_eval(
        EvalConfig(task="shapes", out=str(tmp_path / "out"), limit=4, batch_size=3), model=micro_model
    )
    assert result.metrics == synthetic.score(scripted, samples)  # the demo's scoring function, shared
    per_item = [r["scores"] for r in read_answers(tmp_path / "out")]
    assert [s["accuracy"] for s in per_item[:2]] == [1.0, 1.0] and per_item[3]["accuracy"] == 0.0
    assert per_item[2]["colour"] < 1.0 and per_item[2]["shape"] == 1.0


def test_no_history_leaks_between_questions(micro_model, photo_dir, tmp_path, monkeypatch):
    """Item k's prompt — and answer — are the same whether other items ran before it or not."""
    prompts_seen: list[str] = []
    real_generate = micro_model.generate

    def spy(prompts, images, config=None, streamer=None):
        prompts_seen.extend(prompts)
        return real_generate(prompts, images, config, streamer)

    monkeypatch.setattr(micro_model, "generate", spy)
    rows = pope_rows()
    greedy = GenerateConfig(max_new_tokens=8, repetition_penalty=1.0)
    together = run_eval(
        EvalConfig(
            task="pope",
            data=str(write_lines(tmp_path / "all.jsonl", rows)),
            images=str(photo_dir),
            out=str(tmp_path / "all"),
            generate=greedy,
            batch_size=2,
            prompt_style="chat",
        ),
        model=micro_model,
    )
    assert together.answered_now == 6
    all_prompts = list(prompts_seen)
    all_answers = {r["id"]: r["answer"] for r in read_answers(tmp_path / "all")}
    for k in (0, 5):
        prompts_seen.clear()
        run_eval(
            EvalConfig(
                task="pope",
                data=str(write_lines(tmp_path / f"one{k}.jsonl", [rows[k]])),
                images=str(photo_dir),
                out=str(tmp_path / f"one{k}"),
                generate=greedy,
                prompt_style="chat",
            ),
            model=micro_model,
        )
        assert prompts_seen == [all_prompts[k]]
        assert read_answers(tmp_path / f"one{k}")[0]["answer"] == all_answers[str(100 + k)]
    for k, prompt in enumerate(all_prompts):
        assert prompt.count("###Human:") == 1 and prompt.count("<ImageHere>") == 1
        others = [row["text"] for j, row in enumerate(rows) if j != k]
        assert rows[k]["text"] in prompt and not any(other in prompt for other in others)
        assert not any(len(answer) >= 12 and answer in prompt for answer in all_answers.values())


def test_library_prints_nothing(micro_model, photo_dir, tmp_path, capfd):
    run_eval(
        EvalConfig(
            task="captions",
            data=str(coco_file(tmp_path, photo_dir)),
            images=str(photo_dir),
            out=str(tmp_path / "out"),
            generate=SHORT,
            meteor=False,
            limit=2,
        ),
        model=micro_model,
    )
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == ""


@pytest.mark.parametrize(
    ("task", "lines", "message"),
    [
        (
            "pope",
            ['{"image": "a.jpg", "text": "q?", "label": "yes"}', '{"image": "b.jpg", "text": "q?",'],
            r"pope\.jsonl:2: not valid JSON",
        ),
        ("pope", ['{"image": "a.jpg", "text": "q?"}'], r"pope\.jsonl:1: missing 'label'"),
        (
            "pope",
            ['{"image": "a.jpg", "text": "q?", "label": "maybe"}'],
            r"pope\.jsonl:1: label must be yes or no",
        ),
        (
            "pope",
            [
                '{"question_id": 1, "image": "a.jpg", "text": "q", "label": "no"}',
                "",
                '{"question_id": 1, "image": "a.jpg", "text": "q", "label": "no"}',
            ],
            r"pope\.jsonl:3: id '1' appears twice",
        ),
        (
            "vqa",
            ['{"image": "a.jpg", "question": "q", "answers": "red"}'],
            r"vqa\.jsonl:1: 'answers' must be a non-empty",
        ),
        ("vqa", ["[1, 2]"], r"vqa\.jsonl:1: expected a JSON object"),
        ("judge", ['{"image": "a.jpg", "question": "q"}'], r"judge\.jsonl:1: missing 'reference'"),
    ],
)
def test_malformed_data_is_a_usage_error_naming_file_and_line(task, lines, message, tmp_path):
    data = write_lines(tmp_path / f"{task}.jsonl", lines)
    with pytest.raises(Exception) as error:
        run_eval(EvalConfig(task=task, data=str(data), out=str(tmp_path / "out")))
    assert error.value.exit_code == 2
    assert re.search(message, str(error.value)), str(error.value)
    assert str(data) in str(error.value)
    assert not (tmp_path / "out").exists()  # nothing written before the data is known good


def test_malformed_captions_json_names_the_line(tmp_path):
    data = tmp_path / "captions.json"
    data.write_text('{"images": [],\n "annotations": [\n {"image_id": 1,, "caption": "x"}]}')
    with pytest.raises(Exception, match=r"captions\.json:3: not valid JSON") as error:
        run_eval(EvalConfig(task="captions", data=str(data), out=str(tmp_path / "out")))
    assert error.value.exit_code == 2
    data.write_text(
        json.dumps(
            {"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"image_id": 2, "caption": "x"}]}
        )
    )
    with pytest.raises(Exception, match=r"annotations\[0\]: image_id 2 is not in 'images'"):
        run_eval(EvalConfig(task="captions", data=str(data), out=str(tmp_path / "out")))
    with pytest.raises(Exception, match="give the data"):
        run_eval(EvalConfig(task="pope", out=str(tmp_path / "out")))


@pytest.mark.slow  # a fresh interpreter imports torch + transformers: 5-25 s on 2 busy cores
def test_the_eval_library_never_imports_click_or_rich():
    import subprocess
    import sys

    modules = ["mgpt4.eval.pipeline", "mgpt4.eval.compare", "mgpt4.eval.report"] + [
        f"mgpt4.eval.tasks.{name}" for name in ("captions", "pope", "vqa", "judge", "shapes")
    ]
    code = f"import sys; import {', '.join(modules)}; print(sorted({{'click', 'rich'}} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
