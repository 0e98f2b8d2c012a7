"""`mgpt4 curate` end to end: micro model, a loopback OpenAI-compatible server (real HTTP), a tiny HF
fixer, resume after kill, review, and the cc_sbu_align output read back for stage-2 training."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import webdataset as wds
from click.testing import CliRunner
from transformers import LlamaConfig, LlamaForCausalLM

from mgpt4.cli import cli
from mgpt4.conversation import CONTINUE_MIN_TOKENS, FIX_PROMPT
from mgpt4.curate.fix import FixerConfig, OpenAIFixer, make_fixer
from mgpt4.data.aligned import AlignedDataset
from mgpt4.data.synthetic import make_samples
from mgpt4.model.tokenizer import build_micro_tokenizer
from tests.helpers.bad_images import write_bad_files, write_damaged_shards

# The random micro model writes gibberish, so a clean English fix shares almost no words with it; the
# overlap/length checks of the fixer_commentary filter are turned off where a good fix must pass.
ANY_FIX = ["filters.min_fix_overlap=0", "filters.max_fix_growth=100"]
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
SHAPES = ("circle", "square", "triangle", "star")


def paragraph(index: int) -> str:
    """A distinct clean English description per index (what a good fixer LLM would return)."""
    colour, shape = COLOURS[index % 6], SHAPES[index // 6 % 4]
    return (
        f"The image shows a {colour} {shape} near the middle of the picture. It is the only shape "
        f"there, and the background around it is a plain light gray."
    )


class _ChatHandler(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 (http.server API)
        server = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with server.lock:
            server.requests.append(
                {"path": self.path, "auth": self.headers.get("Authorization"), "body": body}
            )
            action = server.script.pop(0) if server.script else server.default
            ok_count = server.ok_count
            if action == "paragraph":
                server.ok_count += 1
        if isinstance(action, int):
            self.send_response(action)
            self.send_header("Content-Type", "application/json")
            if action == 429:
                self.send_header("Retry-After", "0.05")
            self.end_headers()
            self.wfile.write(b'{"error": {"message": "scripted failure"}}')
            return
        content = paragraph(ok_count) if action == "paragraph" else action
        payload = json.dumps(
            {"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}
        )
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(payload.encode())

    def log_message(self, *args):  # keep pytest output clean
        pass


@pytest.fixture
def openai_server():
    """A chat-completions server on 127.0.0.1; ``script`` lists per-request status codes or contents."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _ChatHandler)
    server.requests, server.script, server.default, server.ok_count = [], [], "paragraph", 0
    server.lock = threading.Lock()
    server.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    for sample in make_samples(6, seed=3):
        sample.image.save(folder / f"{sample.key}.jpg", quality=95)
    return folder


def curate(*args: str, env: dict | None = None, code: int = 0):
    result = CliRunner().invoke(cli, ["curate", *map(str, args)], env=env)
    assert result.exit_code == code, result.output
    return result


def journal(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "curate.jsonl").read_text().splitlines()]


def test_openai_fixer_pipeline_end_to_end(micro_model_dir, image_dir, openai_server, tmp_path):
    out = tmp_path / "aligned"
    # 1st request 500 (retried), then: good, commentary, same as the first (duplicate), good.
    commentary = "Sure! Here is the corrected paragraph: " + paragraph(0)
    openai_server.script = [500, "paragraph", commentary, paragraph(0)]
    result = curate(
        "--model", micro_model_dir, "--images", image_dir, "--out", out, "--num", 4, "--batch-size", 2,
        "--max-new-tokens", 8, "--fixer", "openai", "--fixer-url", openai_server.url,
        "--fixer-model", "test-llm", "--json", "fixer.backoff=0.01", "fixer.workers=1", *ANY_FIX,
        env={"OPENAI_API_KEY": "sk-loopback"},
    )  # fmt: skip
    summary = json.loads(result.stdout)
    assert summary["images"] == 4 and summary["accepted"] == 2 and summary["described_now"] == 4
    assert summary["rejected_by"]["fixer_commentary"] == 1 and summary["rejected_by"]["duplicate"] == 1
    assert summary["continued"] == 4  # 8 tokens < 80: every answer got a Continue turn

    rows = journal(out)
    ids = sorted(p.stem for p in image_dir.glob("*.jpg"))[:4]
    assert [r["image_id"] for r in rows] == ids
    assert len(openai_server.requests) == 5  # one retry after the 500
    for request, row in zip(openai_server.requests[1:], rows, strict=True):
        assert request["path"] == "/v1/chat/completions" and request["auth"] == "Bearer sk-loopback"
        assert request["body"]["model"] == "test-llm"
        assert request["body"]["messages"][-1]["content"] == f"{FIX_PROMPT}\n\n{row['answer']}"
    for row in rows:
        assert row["continued"] and row["tokens"]["first"] <= 8 < CONTINUE_MIN_TOKENS
        assert row["answer"] == f"{row['first']} {row['continuation']}".strip()
        assert row["fix"]["ok"] and row["fix"]["backend"] == "openai"
    assert [r["accepted"] for r in rows] == [True, False, False, True]

    # The released cc_sbu_align format, exactly.
    cap = json.loads((out / "filter_cap.json").read_text())
    assert cap == {"annotations": [{"image_id": ids[0], "caption": paragraph(0)},
                                   {"image_id": ids[3], "caption": paragraph(1)}]}  # fmt: skip
    assert sorted(p.name for p in (out / "image").iterdir()) == [f"{ids[0]}.jpg", f"{ids[3]}.jpg"]
    assert (out / "image" / f"{ids[0]}.jpg").read_bytes() == (image_dir / f"{ids[0]}.jpg").read_bytes()
    assert sorted(p.stem for p in (out / "rejected").iterdir()) == [ids[1], ids[2]]
    report = (out / "report.html").read_text()
    assert all(i in report for i in ids) and "fixer_commentary" in report and "duplicate" in report
    assert "sk-loopback" not in (out / "curate.yaml").read_text()

    # Stage 2 trains on it as it is.
    assert len(AlignedDataset(out)) == 2
    result = CliRunner().invoke(cli, [
        "finetune", "--config", "micro_stage2", "--init", micro_model_dir, f"data.aligned={out}",
        "model.preset=micro",
        f"out={tmp_path / 'stage2'}", "train.max_steps=2", "data.micro_batch_size=2", "train.save_every=2",
        "train.log_every=1", "--json",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    # DeepSpeed may print its own lines to stdout first; the summary is the last JSON object.
    trained = json.loads(result.stdout[result.stdout.index("{\n") :])
    assert trained["steps"] == 2 and math.isfinite(trained["final_loss"])


def test_openai_fixer_statuses(openai_server):
    delays = []
    cfg = FixerConfig(backend="openai", url=openai_server.url, retries=3, backoff=0.5)
    fixer = OpenAIFixer(cfg, sleep=delays.append)
    openai_server.script = [429, 502, "  fixed text  "]
    assert fixer.fix("x").text == "fixed text" and delays == [0.05, 1.0]  # Retry-After, then 2nd backoff
    openai_server.script = [400]  # a client error is not retried
    result = fixer.fix("keep me")
    assert not result.ok and result.text == "keep me" and "HTTP 400" in result.error
    assert len(openai_server.requests) == 4 and delays == [0.05, 1.0]


def test_continue_rule_by_token_count(micro_model_dir, image_dir, tmp_path):
    out = tmp_path / "long"
    curate("--model", micro_model_dir, "--images", image_dir, "--out", out, "--num", 2, "--max-new-tokens",
           CONTINUE_MIN_TOKENS, "--fixer", "none", "--quiet")  # fmt: skip
    rows = journal(out)
    assert rows and all(r["tokens"]["first"] == CONTINUE_MIN_TOKENS for r in rows)  # never stopped early
    assert not any(r["continued"] for r in rows) and all(r["continuation"] is None for r in rows)
    assert all(r["answer"] == r["first"] for r in rows)
    # The same images with a threshold above the answer length are continued.
    out2 = tmp_path / "short"
    curate("--model", micro_model_dir, "--images", image_dir, "--out", out2, "--num", 2,
           "--max-new-tokens", 10, "--fixer", "none", "--quiet", "continue_min_tokens=11")  # fmt: skip
    assert all(r["continued"] and r["tokens"]["continue"] > 0 for r in journal(out2))


def test_fix_failure_keeps_text_and_rerun_refixes(micro_model_dir, image_dir, openai_server, tmp_path):
    out = tmp_path / "aligned"
    args = ["--model", micro_model_dir, "--images", image_dir, "--out", out, "--num", 2,
            "--max-new-tokens", 6, "--fixer", "openai", "--fixer-url", openai_server.url, "--json",
            "fixer.retries=1", "fixer.backoff=0.01", *ANY_FIX]  # fmt: skip
    openai_server.default = 503
    summary = json.loads(curate(*args).stdout)
    assert summary["accepted"] == 0 and summary["fix_errors"] == 2
    assert len(openai_server.requests) == 4  # 2 images × (1 try + 1 retry)
    first_rows = journal(out)
    for row in first_rows:
        assert not row["fix"]["ok"] and "HTTP 503" in row["fix"]["error"]
        assert row["caption"] == row["answer"] != ""  # the generated text is never lost
    openai_server.default = "paragraph"
    summary = json.loads(curate(*args).stdout)
    assert summary["refixed"] == 2 and summary["described_now"] == 0 and summary["accepted"] == 2
    rows = journal(out)
    assert [r["answer"] for r in rows] == [r["answer"] for r in first_rows]  # not regenerated
    assert sorted(r["caption"] for r in rows) == sorted([paragraph(0), paragraph(1)])  # 4 workers: any order


@pytest.mark.slow  # a real process, killed and rerun: 7-19 s on 2 busy cores
def test_resume_after_kill(micro_model_dir, image_dir, tmp_path):
    out = tmp_path / "aligned"
    args = ["--model", micro_model_dir, "--images", str(image_dir), "--out", str(out), "--num", "6",
            "--batch-size", "1", "--max-new-tokens", "12", "--fixer", "rules"]  # fmt: skip
    process = subprocess.Popen(
        [sys.executable, "-c", "from mgpt4.cli import main; main()", "curate", *args, "--quiet"],
        start_new_session=True,
    )
    deadline = time.time() + 60
    while time.time() < deadline and process.poll() is None:
        file = out / "curate.jsonl"
        if file.is_file() and file.read_text().count("\n") >= 1:
            break
        time.sleep(0.05)
    assert process.poll() is None, "finished before it could be killed"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    done_before = [r["image_id"] for r in journal(out)]
    assert 1 <= len(done_before) < 6
    with open(out / "curate.jsonl", "a") as handle:
        handle.write('{"image_id": "torn')  # as if killed mid-write
    summary = json.loads(curate(*args, "--json").stdout)
    assert summary["resumed"] == len(done_before) and summary["described_now"] == 6 - len(done_before)
    ids = [r["image_id"] for r in journal(out)]
    assert ids[: len(done_before)] == done_before and len(ids) == len(set(ids)) == 6


def test_review_drops_rejected_ids(micro_model_dir, image_dir, openai_server, tmp_path):
    out = tmp_path / "aligned"
    curate("--model", micro_model_dir, "--images", image_dir, "--out", out, "--num", 3, "--max-new-tokens", 4,
           "--fixer", "openai", "--fixer-url", openai_server.url, "--fixer-key", "sk-flag", "--device", "cpu",
           "--quiet", *ANY_FIX, env={"OPENAI_API_KEY": "sk-env"})  # fmt: skip
    assert {r["auth"] for r in openai_server.requests} == {"Bearer sk-flag"}  # the flag beats the env
    ids = [a["image_id"] for a in json.loads((out / "filter_cap.json").read_text())["annotations"]]
    assert len(ids) == 3
    reject = tmp_path / "ids.txt"
    reject.write_text(f"{ids[1]}\n# not sure about this one\nno-such-id\n")
    summary = json.loads(curate("review", "--out", out, "--reject", reject, "--json").stdout)
    assert summary["removed"] == 1 and summary["unknown_ids"] == ["no-such-id"] and summary["accepted"] == 2
    cap = json.loads((out / "filter_cap.json").read_text())["annotations"]
    assert [a["image_id"] for a in cap] == [ids[0], ids[2]]
    assert not (out / "image" / f"{ids[1]}.jpg").exists() and (out / "rejected" / f"{ids[1]}.jpg").exists()
    assert "rejected in manual review" in (out / "report.html").read_text()
    # Rerunning curate keeps the reviewer's decision; --reject on the main command works too.
    (tmp_path / "more.txt").write_text(ids[2])
    summary = json.loads(curate("--model", micro_model_dir, "--images", image_dir, "--out", out, "--num", 3,
                                "--reject", tmp_path / "more.txt", "--json").stdout)  # fmt: skip
    assert summary["accepted"] == 1 and summary["rejected_by"]["review"] == 2
    result = curate("review", "--out", out, "nope", code=2)
    assert "none of the 1 rejected id(s)" in result.output


def test_hf_fixer_garbage_is_rejected(micro_model_dir, image_dir, tmp_path):
    llm_dir = tmp_path / "tiny_llm"
    tokenizer = build_micro_tokenizer(512)
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(str(llm_dir))
    tokenizer.save_pretrained(str(llm_dir))
    out = tmp_path / "aligned"
    summary = json.loads(curate(
        "--model", micro_model_dir, "--images", image_dir, "--out", out, "--num", 2, "--max-new-tokens", 6,
        "--fixer", f"hf:{llm_dir}", "fixer.max_new_tokens=12", "--json",
    ).stdout)  # fmt: skip
    assert summary["accepted"] == 0 and summary["rejected_by"]["fixer_commentary"] == 2
    for row in journal(out):
        assert row["fix"]["backend"] == "hf" and row["fix"]["ok"] and row["fixed"] != row["answer"]
    fixer = make_fixer(FixerConfig(backend=f"hf:{llm_dir}"))
    plain = fixer.tokenizer.decode(fixer.prompt_ids("A red circle."), skip_special_tokens=True)
    assert plain == f"{FIX_PROMPT}\n\nA red circle.\n\n"
    # A chat model gets the same message through its chat template.
    fixer.tokenizer.chat_template = (
        "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}assistant:"
    )
    chat = fixer.tokenizer.decode(fixer.prompt_ids("A red circle."), skip_special_tokens=True)
    assert chat == f"user: {FIX_PROMPT}\n\nA red circle.\nassistant:"


def test_shard_input_uses_keys_in_order(micro_model_dir, tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    samples = make_samples(3, seed=5)
    with wds.TarWriter(str(shards / "00000.tar")) as sink:
        for index, sample in enumerate(samples):
            key = f"{index:09d}"
            sink.write({"__key__": key, "jpg": sample.image, "txt": sample.caption,
                        "json": {"key": key, "caption": sample.caption}})  # fmt: skip
    out = tmp_path / "aligned"
    recipe = tmp_path / "curate.yaml"
    recipe.write_text("num: 2\ngenerate:\n  max_new_tokens: 4\nfixer:\n  backend: none\n")
    curate("--config", recipe, "--model", micro_model_dir, "--images", shards, "--out", out, "--quiet",
           "batch_size=1")  # fmt: skip
    assert [r["image_id"] for r in journal(out)] == ["000000000", "000000001"]
    assert all(r["fix"]["backend"] == "none" and r["tokens"]["first"] <= 4 for r in journal(out))
    saved = (out / "curate.yaml").read_text()
    assert "batch_size: 1" in saved and "num: 2" in saved and "backend: none" in saved
    assert len(list((out / "rejected").glob("*.jpg"))) + len(list((out / "image").glob("*.jpg"))) == 2


@pytest.mark.parametrize(
    "args, message",
    [
        (["--images", "x", "--out", "y"], "no model given and no default set: pass --model FOLDER"),
        (["--model", "micro", "--images", "/nonexistent", "--out", "{tmp}"], "--images /nonexistent"),
        (["--model", "micro", "--images", "x", "--out", "y", "--fixer", "gpt"], "fixer.backend"),
        (["--model", "micro", "--images", "x", "--out", "y", "filters.skip=[dupes]"], "filters.skip"),
        (["--model", "micro", "--images", "x", "--out", "y", "--num", "0"], "num: must be"),
        (["review", "--out", "{tmp}", "a"], "run `mgpt4 curate` into"),
        (["review", "--out", "{tmp}", "--reject", "/nonexistent/ids.txt"], "does not exist"),
        (["review", "--out", "{tmp}"], "give --reject FILE and/or ids"),
    ],
)
def test_usage_errors_exit_2(args, message, tmp_path):
    result = curate(*[a.replace("{tmp}", str(tmp_path)) for a in args], code=2)
    assert message in result.output


def test_help_lists_options_and_review():
    result = curate("--help")
    assert "--fixer none|rules|openai|hf:PATH" in result.output and "review" in result.output
    assert "--reject" in curate("review", "--help").output


def _unreadable(rows: list[dict]) -> dict[str, str]:
    """image_id → reason, for the records journaled as unreadable."""
    return {
        r["image_id"]: v["reason"]
        for r in rows
        for v in r["verdicts"]
        if v["name"] == "unreadable" and not v["passed"]
    }


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_bad_images_are_journaled_as_unreadable_and_a_rerun_goes_on(micro_model_dir, tmp_path):
    files = write_bad_files(tmp_path / "images")  # good, 2 bombs, empty, text, truncated (+ a folder.jpg/)
    args = ["--model", micro_model_dir, "--images", tmp_path / "images", "--out", tmp_path / "aligned",
            "--batch-size", 4, "--max-new-tokens", 4, "--fixer", "none", "--json"]  # fmt: skip
    summary = json.loads(curate(*args).stdout)
    unreadable = _unreadable(journal(tmp_path / "aligned"))
    assert sorted(unreadable) == ["bomb", "empty", "middle_bomb", "text", "truncated"]
    assert "89,478,485-pixel limit" in unreadable["bomb"] and "10000x10000" in unreadable["middle_bomb"]
    assert summary["images"] == 6 and summary["rejected_by"]["unreadable"] == 5
    again = json.loads(curate(*args).stdout)  # the same folder, rerun: nothing crashes, nothing is redone
    assert again["described_now"] == 0 and again["resumed"] == 6 and len(journal(tmp_path / "aligned")) == 6
    assert files["good"].exists()


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_damaged_shards_give_unreadable_records_and_warnings(micro_model_dir, tmp_path):
    shards = write_damaged_shards(tmp_path / "shards")
    out = tmp_path / "aligned"
    result = curate("--model", micro_model_dir, "--images", shards, "--out", out, "--max-new-tokens", 3,
                    "--fixer", "none", "--json")  # fmt: skip
    rows = journal(out)
    assert sorted(r["image_id"] for r in rows) == ["a0", "a1", "b0", "b1", "b2", "b3", "c0", "c1"]
    unreadable = _unreadable(rows)
    assert sorted(unreadable) == ["b1", "b2", "c1"] and "pixel limit" in unreadable["b2"]
    assert f"{shards / '00002.tar'}: truncated shard" in result.stderr
    assert f"{shards / '00003.tar'}: unreadable shard" in result.stderr
    assert json.loads(result.stdout)["rejected_by"]["unreadable"] == 3


def test_bad_outputs_settings_and_lists_fail_in_one_line(micro_model_dir, image_dir, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    common = ["--model", micro_model_dir, "--images", image_dir, "--fixer", "none"]
    for args, message in [
        (["--out", a_file], f"--out {a_file}: is a file, not a folder"),
        (
            ["--out", a_file / "sub"],
            f"--out {a_file / 'sub'}: cannot write there (a part of the path is a file",
        ),
        ([f"out={a_file}"], f"--out {a_file}: is a file"),
        (["--out", tmp_path / "o", "--max-new-tokens", -5], "generate.max_new_tokens: must be at least 1"),
        (["--out", tmp_path / "o", "generate.num_beams=0"], "generate.num_beams: must be at least 1"),
    ]:
        result = curate(*common, *args, code=2)
        assert f"error: {message}" in result.stderr and "loaded" not in result.stderr, (args, result.output)
    out = tmp_path / "aligned"
    curate(*common, "--out", out, "--num", 1, "--max-new-tokens", 2, "--quiet")
    latin1 = tmp_path / "ids.txt"
    latin1.write_bytes(b"caf\xe9\n")
    result = curate("review", "--out", out, "--reject", latin1, code=1)
    assert f"error: {latin1}: the id list is not UTF-8 text" in result.stderr
    with open(out / "curate.jsonl", "a") as journal_file:
        journal_file.write('["not", "a record"]\n')
    result = curate(*common, "--out", out, "--num", 2, code=1)
    assert f"error: {out / 'curate.jsonl'}:2: not a curate record" in result.stderr
