"""The judge task against a loopback OpenAI-compatible endpoint (real HTTP): rubric, retries, ratings,
reasons, failed ratings retried on the next run without generating again, and no key on disk."""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from helpers.eval_runs import SHORT, read_answers, write_lines

from mgpt4.errors import UsageError
from mgpt4.eval.config import EvalConfig, JudgeConfig
from mgpt4.eval.pipeline import run_eval
from mgpt4.eval.tasks.judge import JUDGE_RUBRIC


class _JudgeHandler(BaseHTTPRequestHandler):
    """Rates an answer from the reference's number: "reference 4" → score 4 (item 3: no score at first)."""

    def do_POST(self):  # noqa: N802 - http.server API
        server = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        user = body["messages"][-1]["content"]
        number = int(re.search(r"Reference answer: reference (\d+)", user).group(1))
        with server.lock:
            server.requests.append(
                {"auth": self.headers.get("Authorization"), "body": body, "number": number}
            )
            fail = server.fail_first > 0
            server.fail_first -= fail
        if fail:
            self.send_response(503)
            self.end_headers()
            return
        if number == 3 and server.garble_three:
            content = "I would rather not say."
        else:
            content = f'Here you go: {{"score": {number}, "reason": "reason for {number}"}}'
        payload = json.dumps(
            {"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}
        )
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(payload.encode())

    def log_message(self, *args):
        pass


@pytest.fixture
def judge_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _JudgeHandler)
    server.requests, server.fail_first, server.garble_three = [], 1, True
    server.lock = threading.Lock()
    server.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def judge_data(folder: Path) -> Path:
    rows = [
        {
            "question_id": f"q{i}",
            "image": f"img{i}.jpg",
            "question": f"What is in picture {i}?",
            "reference": f"reference {i}",
        }
        for i in range(1, 6)
    ]
    return write_lines(folder / "judge.jsonl", rows)


def test_judge_end_to_end_with_retry_and_rerun(micro_model, photo_dir, tmp_path, judge_server, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-loopback-secret")
    data = judge_data(tmp_path)
    out = tmp_path / "out"
    judge = JudgeConfig(url=judge_server.url, model="judge-1", workers=2, backoff=0.01, retries=2)
    cfg = EvalConfig(
        task="judge",
        data=str(data),
        images=str(photo_dir),
        out=str(out),
        generate=SHORT,
        batch_size=2,
        judge=judge,
    )
    calls = []
    real_generate = micro_model.generate
    monkeypatch.setattr(
        micro_model, "generate", lambda *a, **k: calls.append(len(a[0])) or real_generate(*a, **k)
    )

    result = run_eval(cfg, model=micro_model)
    assert sum(calls) == 5
    assert len(judge_server.requests) == 6  # one 503, retried, then one request per answer
    for request in judge_server.requests:
        messages = request["body"]["messages"]
        assert messages[0] == {"role": "system", "content": JUDGE_RUBRIC}
        assert request["body"]["model"] == "judge-1" and request["auth"] == "Bearer sk-loopback-secret"
    records = {r["id"]: r for r in read_answers(out)}
    for i in (1, 2, 4, 5):
        judged = records[f"q{i}"]["judge"]
        assert (judged["rating"], judged["reason"], judged["ok"]) == (i, f"reason for {i}", True)
        user = next(r for r in judge_server.requests if r["number"] == i)["body"]["messages"][1]["content"]
        assert f"What is in picture {i}?" in user and records[f"q{i}"]["answer"] in user
    assert records["q3"]["judge"]["ok"] is False and records["q3"]["scores"] == {"rating": None}
    assert result.metrics["mean_rating"] == pytest.approx(3.0)  # (1 + 2 + 4 + 5) / 4
    assert result.metrics["histogram"] == {str(k): int(k in (1, 2, 4, 5)) for k in range(1, 11)}
    assert (result.metrics["rated"], result.metrics["unrated"]) == (4, 1)
    assert any("no rating yet" in note for note in result.notes)
    scores = json.loads((out / "scores.json").read_text())
    assert scores["judge"]["rubric"] == JUDGE_RUBRIC and scores["judge"]["model"] == "judge-1"

    # The endpoint behaves now: a rerun asks the judge about q3 only and generates nothing.
    judge_server.garble_three = False
    calls.clear()
    judge_server.requests.clear()
    result = run_eval(cfg, model=micro_model)
    assert calls == [] and [r["number"] for r in judge_server.requests] == [3]
    assert result.metrics["mean_rating"] == pytest.approx(3.0) and result.metrics["unrated"] == 0
    assert result.resumed == 5 and result.answered_now == 0
    for path in out.rglob("*"):
        assert path.is_dir() or "sk-loopback-secret" not in path.read_text(errors="replace")


def test_judge_refuses_a_bad_url_before_generating(micro_model, photo_dir, tmp_path):
    cfg = EvalConfig(
        task="judge",
        data=str(judge_data(tmp_path)),
        images=str(photo_dir),
        out=str(tmp_path / "out"),
        judge=JudgeConfig(url="ftp://nowhere"),
    )
    with pytest.raises(UsageError, match="judge.url"):
        run_eval(cfg, model=micro_model)
    assert not (tmp_path / "out").exists()
