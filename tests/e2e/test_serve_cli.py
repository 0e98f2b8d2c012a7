"""`mgpt4 serve` as a process on a free loopback port, talked to with the official `openai` client."""

from __future__ import annotations

import io
import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers.loopback_http import LoopbackServer
from helpers.serving import data_url, image_message
from PIL import Image

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'mgpt4[serve]'")
openai = pytest.importorskip("openai", reason="the dev extra is not installed: pip install 'mgpt4[dev]'")

MGPT4 = str(Path(sys.executable).with_name("mgpt4"))
KEY = "sk-test-key"


def png(colour: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 40), colour).save(buffer, format="PNG")
    return buffer.getvalue()


class Server:
    """``mgpt4 serve ARGS`` in a process; ``url`` once it says where it listens."""

    def __init__(self, *args: str) -> None:
        env = dict(os.environ, OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen(
            [MGPT4, "serve", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            start_new_session=True,
        )
        self.stderr = ""
        found = None
        deadline = time.monotonic() + 120
        while found is None and time.monotonic() < deadline and self.proc.poll() is None:
            if select.select([self.proc.stderr], [], [], 0.2)[0]:
                self.stderr += os.read(self.proc.stderr.fileno(), 65536).decode(errors="replace")
                found = re.search(r"serving \S+ at (http://127\.0\.0\.1:\d+)", self.stderr)
        assert found, f"the server did not start:\n{self.stderr}"
        self.url = found[1]

    def stop(self) -> tuple[int, str, str]:
        """SIGINT (Ctrl-C), as a user stops it; returns the exit code, stdout and the rest of stderr."""
        self.proc.send_signal(signal.SIGINT)
        out, err = self.proc.communicate(timeout=60)
        return self.proc.returncode, out.decode(), self.stderr + err.decode()


@pytest.mark.slow  # a real server process (the in-process API tests are in tests/serve): 8-12 s
def test_openai_client_plain_streamed_and_images(micro_model_dir, tmp_path):
    local = tmp_path / "images"
    local.mkdir()
    (local / "red.png").write_bytes(png("red"))
    with LoopbackServer() as web:
        remote = web.add_image("blue.png", png("blue"))
        server = Server(
            "-m",
            micro_model_dir,
            "--port",
            "0",
            "--api-key",
            KEY,
            "--allow-local-images",
            str(local),
            "--allow-remote-images",
            "--json",
            "--model-name",
            "mgpt4-micro",
        )
        try:
            client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)
            params = {"model": "mgpt4-micro", "temperature": 0, "max_tokens": 6}
            plain = client.chat.completions.create(messages=[{"role": "user", "content": "hi"}], **params)
            text = plain.choices[0].message.content
            assert plain.model == "mgpt4-micro" and plain.usage.completion_tokens <= 6

            chunks = client.chat.completions.create(
                messages=[{"role": "user", "content": "hi"}], stream=True, **params
            )
            streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            assert streamed == text  # greedy: the same answer, token by token

            for url in (data_url(png("green")), "red.png", remote):
                answer = client.chat.completions.create(
                    messages=[image_message("what colour?", url)], **params
                )
                assert answer.choices[0].finish_reason in ("stop", "length")
                assert answer.usage.prompt_tokens > plain.usage.prompt_tokens  # the image's tokens count

            wrong = openai.OpenAI(base_url=f"{server.url}/v1", api_key="sk-wrong", max_retries=0)
            with pytest.raises(openai.AuthenticationError):
                wrong.chat.completions.create(messages=[{"role": "user", "content": "hi"}], **params)
        finally:
            code, stdout, stderr = server.stop()
    assert code == 0, stderr[-3000:]
    logs = [json.loads(line) for line in stdout.splitlines()]  # stdout: one JSON line per request, only
    assert [entry["event"] for entry in logs] == ["chat.completion"] * 6
    assert [entry["status"] for entry in logs] == [200] * 5 + [401]  # the wrong key is logged too
    answered = logs[:5]
    assert [entry["images"] for entry in answered] == [0, 0, 1, 1, 1]
    assert [entry["stream"] for entry in answered] == [False, True, False, False, False]
    assert all(entry["completion_tokens"] <= 6 and entry["batch_size"] >= 1 for entry in answered)
    assert "stopped http://127.0.0.1:" in stderr and "Traceback" not in stderr


def test_serve_refuses_bad_settings_in_one_line(micro_model_dir, tmp_path):
    from click.testing import CliRunner

    from mgpt4.cli import cli

    result = CliRunner().invoke(cli, ["serve", "-m", micro_model_dir, "--port", "70000"])
    assert result.exit_code == 2 and "serve.port: must be 0..65535, got 70000" in result.stderr
    missing = tmp_path / "no"
    result = CliRunner().invoke(cli, ["serve", "-m", micro_model_dir, "--allow-local-images", str(missing)])
    assert (
        result.exit_code == 2 and f"serve.allow_local_images: {missing} is not a directory" in result.stderr
    )
    assert result.exception is None or isinstance(result.exception, SystemExit)
