"""`mgpt4 chat` through the CLI: piped stdin (scripts, CI) and a real pseudo-terminal (interactive)."""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from mgpt4.cli import cli
from tests.helpers.bad_images import write_bad_files

MGPT4 = str(Path(sys.executable).with_name("mgpt4"))


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # micro model: threads only add overhead, a lot on a shared CPU
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def pictures(tmp_path) -> list[str]:
    paths = []
    for colour in ("red", "blue"):
        Image.new("RGB", (48, 32), colour).save(tmp_path / f"{colour}.png")
        paths.append(str(tmp_path / f"{colour}.png"))
    return paths


def chat(stdin: str, *args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, ["chat", *args], input=stdin, catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def test_piped_lines_are_turns_and_answers_go_to_stdout(micro_model_dir, pictures):
    script = f"what colour is it?\n\n/image {pictures[1]}\nand now?\n/set temperature 0.5\n"
    code, out, err = chat(
        script, "-m", micro_model_dir, pictures[0], "--greedy", "--max-new-tokens", "6", "--json"
    )
    assert code == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["question"] for r in records] == ["what colour is it?", "and now?"]
    assert all(set(r) == {"question", "answer", "tokens", "seconds"} and r["tokens"] <= 6 for r in records)
    assert "empty input" in err and "will go with your next question" in err and "temperature = 0.5" in err

    # Plain mode streams the same greedy answers, one per line, and nothing else on stdout.
    code, plain, err = chat(script, "-m", micro_model_dir, pictures[0], "--greedy", "--max-new-tokens", "6")
    assert code == 0, err
    assert plain == "".join(r["answer"] + "\n" for r in records)
    code, unstreamed, _ = chat(
        script, "-m", micro_model_dir, pictures[0], "--greedy", "--max-new-tokens", "6", "--no-stream"
    )
    assert unstreamed == plain


def test_save_and_load_resume_the_conversation(micro_model_dir, pictures, tmp_path):
    transcript = tmp_path / "chat.json"
    args = ["-m", micro_model_dir, "--greedy", "--max-new-tokens", "4", "--json"]
    code, _, err = chat(f"first?\n/save {transcript}\n/exit\nnever asked\n", *args, pictures[0])
    assert code == 0, err
    saved = json.loads(transcript.read_text())
    assert [t["question"] for t in saved["turns"]] == ["first?"] and saved["turns"][0]["image"] == pictures[0]
    code, out, err = chat(f"second?\n/save {transcript}\n", *args, "--load", str(transcript))
    assert code == 0, err
    assert [t["question"] for t in json.loads(transcript.read_text())["turns"]] == ["first?", "second?"]
    assert len(out.splitlines()) == 1


def test_bad_input_is_reported_and_the_session_goes_on(micro_model_dir, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    script = f"/image {notes}\n/image nope.png\n/bogus\n/set top_k 3\nstill answering?\n"
    code, out, err = chat(script, "-m", micro_model_dir, "missing.jpg", "--max-new-tokens", "3", "--json")
    assert code == 1  # scripts learn that some lines failed ...
    assert json.loads(out)["question"] == "still answering?"  # ... but every good line was answered
    for fragment in (
        "missing.jpg: no such image file",
        "unsupported file type",
        "nope.png: no such image file",
        "unknown command /bogus",
        "unknown key 'top_k'",
        "5 input line(s) failed",
    ):
        assert fragment in err, fragment
    assert chat("hi\n")[0] == 2  # no --model
    code, _, err = chat("", "-m", micro_model_dir, "a.png", "b.png")
    assert code == 2 and "one image" in err
    code, _, err = chat("", "-m", micro_model_dir, "--load", str(tmp_path / "none.json"))
    assert code == 2 and "none.json" in err


class Terminal:
    """`mgpt4 chat` on a pseudo-terminal: type lines, wait for text, send Ctrl-C."""

    def __init__(self, args: list[str], cwd: Path, **env_extra: str) -> None:
        self.master, slave = os.openpty()
        env = dict(os.environ, TERM="xterm-256color", COLUMNS="100", LINES="40", OMP_NUM_THREADS="1")
        env.update(env_extra)
        self.proc = subprocess.Popen(
            [MGPT4, "chat", *args],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
        os.close(slave)
        self.output = b""

    def wait_for(self, text: str, timeout: float = 60) -> str:
        start, deadline = len(self.output), time.monotonic() + timeout
        while time.monotonic() < deadline:
            if select.select([self.master], [], [], 0.1)[0]:
                try:
                    self.output += os.read(self.master, 65536)
                except OSError:  # the child closed the terminal
                    break
                if text.encode() in self.output[start:]:
                    return self.output[start:].decode(errors="replace")
        raise AssertionError(
            f"no {text!r} within {timeout}s; got:\n{self.output[start:].decode(errors='replace')}"
        )

    def type(self, line: str) -> None:
        os.write(self.master, line.encode() + b"\r")

    def close(self) -> int:
        try:
            return self.proc.wait(timeout=20)
        finally:
            os.close(self.master)


@pytest.mark.slow  # a real process on a pseudo-terminal: 7-13 s on 2 busy cores
def test_interactive_terminal_streams_and_ctrl_c_stops_only_the_answer(micro_model_dir, pictures, tmp_path):
    # Strict decoding, as in a UTF-8 locale (the C locale's surrogateescape is covered by the piped test).
    term = Terminal(["-m", micro_model_dir, pictures[0], "--max-new-tokens", "8"], tmp_path,
                    PYTHONIOENCODING="utf-8:strict")  # fmt: skip
    try:
        banner = term.wait_for("you")
        assert "mgpt4 chat" in banner and "red.png" in banner and "/help" in banner
        term.type("what is in the picture?")
        shown = term.wait_for("tokens ·")
        assert "\x1b[?25l" in shown  # rich Live took over the answer area (streaming markdown)
        term.type("/help")
        assert "/image PATH" in term.wait_for("/exit")
        term.type("/image nowhere.png")
        assert "no such image file" in term.wait_for("nowhere.png: ")
        os.write(term.master, b"caf\xe9?\r")  # Latin-1 typed into a UTF-8 terminal
        term.wait_for("that line is not utf-8 text (invalid continuation byte); type it again")
        # A long answer, interrupted: the session survives with the partial answer in its history.
        term.type("/set max_new_tokens 1500")
        term.wait_for("max_new_tokens = 1500")
        term.type("/set max_length 3000")
        term.wait_for("max_length = 3000")
        term.type("tell me everything")
        term.wait_for("\x1b[?25l")
        time.sleep(0.5)
        term.proc.send_signal(signal.SIGINT)
        assert "stopped" in term.wait_for("tokens ·")
        term.type(f"/save {tmp_path / 'session.json'}")
        term.wait_for("saved 2 turn(s)")
        term.type("/exit")
        assert term.close() == 0
    finally:
        if term.proc.poll() is None:
            term.proc.kill()
    turns = json.loads((tmp_path / "session.json").read_text())["turns"]
    assert turns[1]["question"] == "tell me everything" and turns[1]["answer"]


def test_recipe_file_sets_the_model_and_decoding(micro_model_dir, pictures, tmp_path):
    recipe = tmp_path / "chat.yaml"
    recipe.write_text(
        f"checkpoint: {micro_model_dir}\njson: true\ngenerate:\n  do_sample: false\n  max_new_tokens: 3\n"
    )
    code, out, err = chat("hello\n", "-c", str(recipe), pictures[0])
    assert code == 0, err
    assert json.loads(out)["tokens"] <= 3


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_hostile_lines_are_one_line_errors_and_the_chat_goes_on(micro_model_dir, pictures, tmp_path):
    files = write_bad_files(tmp_path / "bad")
    lines = [
        f"/image {files['bomb']}",
        f"/image {files['middle_bomb']}",
        f"/image {files['folder']}",
        f"/image {files['truncated']}",
        "/set max_new_tokens [",
        "/set num_beams 0",
        "/set temperature 0",
        "/set top_p 1.5",
        f"/save {tmp_path}",
        f"/save {pictures[0]}/chat.json",
    ]
    odd_name = tmp_path / os.fsdecode(b"r\xe9d.png")  # a Latin-1 file name: fine on Linux
    shutil.copy(pictures[0], odd_name)
    script = "".join(f"{line}\n" for line in lines).encode() + b"caf\xe9 latin-1?\n"
    script += b"/image " + os.fsencode(odd_name) + b"\nstill there?\n"
    result = CliRunner().invoke(
        cli, ["chat", "-m", micro_model_dir, "--max-new-tokens", "3", "--json"], input=script,
        catch_exceptions=False,
    )  # fmt: skip
    assert result.exit_code == 1
    assert [json.loads(line)["question"] for line in result.stdout.splitlines()] == ["still there?"]
    limit = "> the 89,478,485-pixel limit"
    for fragment in (
        f"error: {files['bomb']}: cannot read image (400,000,000 pixels {limit}",
        f"error: {files['middle_bomb']}: cannot read image (10000x10000 = 100,000,000 pixels {limit}",
        f"error: {files['folder']}: is a folder, not an image file",
        f"error: {files['truncated']}: cannot read image (",
        "error: /set max_new_tokens: not valid YAML (line 1, column 2: expected the node content",
        "error: generate.num_beams: must be at least 1",
        "error: generate.temperature: must be above 0",
        "error: generate.top_p: must be in (0, 1]",
        f"error: /save {tmp_path}: is a folder; give a file path",
        f"error: /save {pictures[0]}/chat.json: cannot write there (a part of the path is a file",
        "error: the question is not UTF-8 text (byte 0xe9 at character 4); send UTF-8 instead",
        "11 input line(s) failed",
    ):
        assert fragment in result.stderr, fragment


def test_bad_settings_and_transcripts_are_refused_at_start(micro_model_dir, pictures, tmp_path):
    for args, message in [
        (["--num-beams", "0"], "generate.num_beams: must be at least 1"),
        (["--max-new-tokens", "-5"], "generate.max_new_tokens: must be at least 1, got -5"),
        (["--temperature", "0"], "generate.temperature: must be above 0 (for greedy decoding set do_sample"),
        (["--top-p", "-0.1"], "generate.top_p: must be in (0, 1]"),
    ]:
        code, out, err = chat("hello\n", "-m", micro_model_dir, *args)
        assert code == 2 and f"error: {message}" in err and not out, (args, err)
    transcript = tmp_path / "chat.json"
    transcript.write_text(json.dumps({"turns": [{"question": "hi", "answer": "yo", "image": 7}]}))
    code, _, err = chat("", "-m", micro_model_dir, "--load", str(transcript))
    assert code == 1 and f"error: {transcript}: not a chat transcript" in err
