"""The chat page at ``/`` in a real headless Chromium (Debian's package, driven by Playwright): attach an
image, ask, watch the answer stream in, ask again with history, reset. It uses only the public API."""

from __future__ import annotations

import os
import shutil

import pytest
from helpers.loopback_http import make_png
from helpers.serving import data_url, start_server

CHROMIUM = "/usr/bin/chromium"
# No GPU, no sandbox (root in CI), and no traffic beyond the loopback server under test.
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


def _needs(what: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{what} is required in CI (see tests/serve/test_page.py)")
    pytest.skip(f"{what} is not installed")


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _needs("the playwright Python package (pip install 'mgpt4[dev]')")
    if not shutil.which(CHROMIUM):
        _needs(f"{CHROMIUM} (apt-get install chromium)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def page_server(serve_model, one_thread):
    with start_server(serve_model) as running:
        yield running


def test_attach_ask_stream_follow_up_and_reset(browser, page_server, tmp_path):
    png = make_png(120, 90, seed=11)
    image_file = tmp_path / "shapes.png"
    image_file.write_bytes(png)
    page = browser.new_page()
    page.goto(page_server.url + "/")
    page.wait_for_function("document.getElementById('model-name').textContent === 'micro'")
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "24")

    page.set_input_files("#image-input", str(image_file))
    page.wait_for_selector("#attachment.shown")
    # Count how often the answer's text changes while it streams in.
    page.evaluate(
        """() => { window.updates = 0; new MutationObserver(() => window.updates++)
        .observe(document.getElementById('log'), {subtree: true, characterData: true, childList: true}); }"""
    )
    page.fill("#question", "what shapes are in the picture?")
    page.click("#send")
    page.wait_for_selector(".msg.assistant[data-done='true']", timeout=60_000)
    answer = page.inner_text(".msg.assistant .text")
    assert page.locator(".msg.user img").count() == 1 and page.locator(".msg.error").count() == 0
    assert not page.is_visible("#attachment")  # the image went with the question

    # The page showed exactly what the API answers to the same request.
    expected = page_server.chat(
        [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": data_url(png)}},
                    {"type": "text", "text": "what shapes are in the picture?"},
                ],
            }
        ],
        max_tokens=24,
    )
    assert answer == expected.choices[0].message.content and answer
    first = page_server.logs[-2]
    assert first["stream"] is True and first["images"] == 1 and first["status"] == 200
    assert page.evaluate("window.updates") > 3  # several deltas arrived, not one block

    # A follow-up carries the history (and its image) in the request.
    page.fill("#question", "and the colours?")
    page.keyboard.press("Enter")
    page.wait_for_selector(".msg.assistant >> nth=1", timeout=60_000)
    page.wait_for_function("document.querySelectorAll(\".msg.assistant[data-done='true']\").length === 2")
    follow_up = page_server.logs[-1]
    assert follow_up["images"] == 1 and follow_up["prompt_tokens"] > first["prompt_tokens"]
    page.screenshot(path=str(tmp_path / "chat.png"))

    page.click("#reset")
    assert page.locator(".msg").count() == 0 and "cleared" in page.inner_text("#status")
    page.fill("#question", "hello")
    page.click("#send")
    page.wait_for_function("document.querySelectorAll(\".msg.assistant[data-done='true']\").length === 1")
    fresh = page_server.logs[-1]
    assert fresh["images"] == 0 and fresh["prompt_tokens"] < first["prompt_tokens"]
    page.close()


def test_the_page_shows_api_errors(browser, page_server):
    page = browser.new_page()
    page.goto(page_server.url + "/")
    page.fill("#max-tokens", "100000")  # over the server's max_tokens cap
    page.fill("#question", "hi")
    page.click("#send")
    page.wait_for_selector(".msg.error")
    assert "max_tokens" in page.inner_text(".msg.error")
    assert page.locator(".msg.assistant").count() == 0
    page.close()
