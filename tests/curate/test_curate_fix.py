"""Fixers: the rule-based cleanup, backend selection and HTTP failure handling (the HTTP success paths
and the HF backend run end to end in tests/e2e/test_curate_cli.py)."""

from __future__ import annotations

import socket

import pytest

from mgpt4.conversation import FIX_PROMPT
from mgpt4.curate.fix import FixerConfig, NoneFixer, OpenAIFixer, make_fixer, rules_fix
from mgpt4.errors import UsageError


def test_rules_fix_removes_repeats_symbols_and_unfinished_sentence():
    text = (
        "The image shows a red red circle.\x17 It sits on the left ��� side. @@@ "
        "The image shows a red circle. There is also a blue square near the"
    )
    assert rules_fix(text) == "The image shows a red circle. It sits on the left side."


def test_rules_fix_keeps_a_clean_paragraph_and_a_lone_fragment():
    clean = "A red circle is in the top left corner. The background is plain."
    assert rules_fix(clean) == clean
    assert rules_fix("a red circle on the left") == "a red circle on the left"


def test_make_fixer_backends():
    assert isinstance(make_fixer(FixerConfig(backend="none")), NoneFixer)
    assert make_fixer(FixerConfig(backend="rules")).fix("Hi. Hi. Hi there").text == "Hi."
    with pytest.raises(UsageError, match="fixer.backend"):
        make_fixer(FixerConfig(backend="gpt"))
    with pytest.raises(UsageError, match="no config.json"):
        make_fixer(FixerConfig(backend="hf:/nonexistent/model"))
    with pytest.raises(UsageError, match="fixer.url"):
        make_fixer(FixerConfig(backend="openai", url="ftp://example"))


def test_openai_request_uses_fix_prompt_and_env(monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1/")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-env")
    fixer = OpenAIFixer(FixerConfig(backend="openai", model="m1", system="be terse"))
    assert fixer.url == "http://127.0.0.1:9/v1" and fixer.key == "sk-env"
    body = fixer.request_body("A red circle.")
    assert body["model"] == "m1"
    assert body["messages"] == [
        {"role": "system", "content": "be terse"},
        {"role": "user", "content": FIX_PROMPT + "\n\nA red circle."},
    ]
    assert OpenAIFixer(FixerConfig(url="http://h/v1", key="sk-flag")).key == "sk-flag"


def test_openai_connection_failure_keeps_text_after_backoff():
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    delays = []
    cfg = FixerConfig(backend="openai", url=f"http://127.0.0.1:{port}/v1", retries=3, backoff=0.5, timeout=5)
    result = OpenAIFixer(cfg, sleep=delays.append).fix("A red circle on the left.")
    assert not result.ok
    assert result.text == "A red circle on the left."
    assert "connection failed" in result.error
    assert delays == [0.5, 1.0, 2.0]  # exponential backoff, then give up
