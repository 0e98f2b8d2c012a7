"""Bad requests get 400 (or 401/413) with OpenAI's error body, never a traceback; caps hold; image
sources outside base64 data URLs are refused unless the server allows them."""

from __future__ import annotations

import io
import json

import httpx2 as httpx
import numpy as np
import openai
import pytest
from helpers.loopback_http import LoopbackServer, make_png, png_header_only
from helpers.serving import data_url, image_message, start_server
from PIL import Image

from mgpt4.errors import ConfigError
from mgpt4.serve import ServeConfig

MiB = 1 << 20


@pytest.fixture(scope="module")
def capped(serve_model, one_thread, tmp_path_factory):
    """A server with small caps, a local image folder, remote images on, and a 1 s fetch deadline."""
    folder = tmp_path_factory.mktemp("allowed_images")
    (folder / "inside.png").write_bytes(make_png(40, 40, seed=1))
    with LoopbackServer() as images:
        with start_server(
            serve_model,
            max_body_bytes=2 * MiB,
            max_image_bytes=1 * MiB,
            max_image_pixels=1000 * 1000,
            max_images=2,
            max_tokens=64,
            allow_local_images=str(folder),
            allow_remote_images=True,
            remote_image_timeout_s=1.0,
        ) as running:
            running.images = images
            running.folder = folder
            yield running


def post(server, body, raw: bytes | None = None, headers: dict | None = None) -> httpx.Response:
    content = raw if raw is not None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **(headers or {})}
    return httpx.post(f"{server.url}/v1/chat/completions", content=content, headers=headers, timeout=60)


def ask(content, **fields) -> dict:
    body = {
        "model": "micro",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 2,
        "temperature": 0,
    }
    return body | fields


def assert_error(response: httpx.Response, status: int, param: str | None = None, code: str | None = None):
    assert response.status_code == status, response.text
    assert "Traceback" not in response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error


BAD_REQUESTS = {
    "messages missing": ({"model": "micro"}, "messages", None),
    "messages empty": ({"model": "micro", "messages": []}, "messages", None),
    "model missing": ({"messages": [{"role": "user", "content": "hi"}]}, "model", None),
    "max_tokens a string": (ask("hi", max_tokens="5"), "max_tokens", None),
    "max_tokens zero": (ask("hi", max_tokens=0), "max_tokens", None),
    "max_tokens over the cap": (ask("hi", max_tokens=65), "max_tokens", None),
    "temperature too high": (ask("hi", temperature=2.5), "temperature", None),
    "temperature a string": (ask("hi", temperature="hot"), "temperature", None),
    "top_p zero": (ask("hi", top_p=0), "top_p", None),
    "seed negative": (ask("hi", seed=-1), "seed", None),
    "stop not strings": (ask("hi", stop=[1]), "stop[0]", None),
    "five stops": (ask("hi", stop=list("abcde")), "stop", None),
    "n of two": (ask("hi", n=2), "n", None),
    "stream not a bool": (ask("hi", stream="yes"), "stream", None),
    "unknown role": (
        {"model": "m", "messages": [{"role": "tool", "content": "x"}]},
        "messages[0].role",
        None,
    ),
    "content a number": (ask(5), "messages[0].content", None),
    "unknown part type": (ask([{"type": "input_audio", "input_audio": {}}]), "messages[0].content[0]", None),
    "image_url without url": (ask([{"type": "image_url", "image_url": {}}]), None, None),
    "ends with assistant": (
        {"model": "m", "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
        "messages",
        None,
    ),
    "assistant first": (
        {"model": "m", "messages": [{"role": "assistant", "content": "b"}]},
        "messages[0]",
        None,
    ),
    "image in a system message": (
        {
            "model": "m",
            "messages": [{"role": "system", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
        },
        "messages[0].content",
        None,
    ),
    "too many images": (
        ask([{"type": "image_url", "image_url": {"url": data_url(make_png(8, 8))}}] * 3),
        "messages",
        "too_many_images",
    ),
    "prompt too long": (ask("red " * 600), "messages", "context_length_exceeded"),
    "prompt + max_tokens too long": (ask("red " * 440, max_tokens=64), "messages", "context_length_exceeded"),
    "not base64": (
        ask([{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}]),
        None,
        None,
    ),
    "not an image": (
        ask([{"type": "image_url", "image_url": {"url": data_url(b"hello world", "image/png")}}]),
        "messages[0].content[0].image_url.url",
        None,
    ),
    "data URL of text": (
        ask([{"type": "image_url", "image_url": {"url": "data:text/plain;base64,aGk="}}]),
        None,
        None,
    ),
    "image placeholder in text": (ask("look <ImageHere> here"), "messages[0].content", None),
    "ftp URL": (ask([{"type": "image_url", "image_url": {"url": "ftp://example.org/a.png"}}]), None, None),
}


@pytest.mark.parametrize("body,param,code", BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
def test_bad_request_gets_400_with_an_openai_error_body(capped, body, param, code):
    assert_error(post(capped, body), 400, param, code)
    assert capped.logs[-1]["status"] == 400


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b"", '{"model": "\u00e9"'.encode("latin-1")])
def test_malformed_json_gets_400(capped, raw):
    assert_error(post(capped, None, raw=raw), 400)


def test_the_openai_client_raises_bad_request_with_the_message(capped):
    with pytest.raises(openai.BadRequestError) as caught:
        capped.chat([{"role": "user", "content": "hi"}], temperature=9)
    assert caught.value.status_code == 400 and "temperature" in str(caught.value)


def test_unknown_fields_are_ignored_as_openai_does(capped):
    body = ask("hi", frequency_penalty=0.5, user="me", metadata={"a": 1}, tools=[], some_future_field=[1, {}])
    body["messages"][0]["weird"] = True
    response = post(capped, body)
    assert response.status_code == 200 and response.json()["choices"][0]["message"]["role"] == "assistant"


def test_body_over_the_cap_gets_413(capped):
    big = ask("x" * (2 * MiB + 10))
    error = assert_error(post(capped, big), 413, code="request_too_large")
    assert str(2 * MiB) in error["message"]
    # A chunked body (no Content-Length) is cut at the cap too.
    chunks = (
        piece for piece in [json.dumps(big).encode()[i : i + 65536] for i in range(0, 2 * MiB + 100, 65536)]
    )
    response = httpx.post(f"{capped.url}/v1/chat/completions", content=chunks, timeout=60)
    assert_error(response, 413)


def test_image_bytes_and_decoded_pixels_are_capped(capped):
    noise = np.random.default_rng(0).integers(0, 255, (700, 700, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, "PNG")  # ~1.4 MiB: over the 1 MiB image cap, under the body cap
    too_big = ask([{"type": "image_url", "image_url": {"url": data_url(buffer.getvalue())}}])
    assert_error(post(capped, too_big), 400, code="image_too_large")
    # Decompression bombs: 25 (our cap: 1) and 400 (PIL's own limit: 179) megapixels in a few bytes.
    for side, words in ((5000, "5000x5000"), (20000, "400000000 pixels")):
        bomb = ask([{"type": "image_url", "image_url": {"url": data_url(png_header_only(side, side))}}])
        error = assert_error(post(capped, bomb), 400, code="image_too_large")
        assert words in error["message"]


def test_local_images_only_inside_the_allowed_folder(capped, tmp_path):
    inside = ask([{"type": "image_url", "image_url": {"url": "inside.png"}}])
    assert post(capped, inside).status_code == 200
    as_file_url = ask([{"type": "image_url", "image_url": {"url": f"file://{capped.folder / 'inside.png'}"}}])
    assert post(capped, as_file_url).status_code == 200
    outside = tmp_path / "outside.png"
    outside.write_bytes(make_png(20, 20))
    for url in ("../outside.png", str(outside), f"file://{outside}", "/etc/passwd", "missing.png"):
        assert_error(post(capped, ask([{"type": "image_url", "image_url": {"url": url}}])), 400)


def test_remote_images_are_fetched_with_size_and_time_caps(capped, serve_model):
    png = make_png(50, 50, seed=9)
    url = capped.images.add_image("ok.png", png)
    remote = post(capped, ask([image_message("what", url)["content"][1]]))
    inline = post(capped, ask([image_message("what", data_url(png))["content"][1]]))
    assert remote.status_code == 200 and remote.json()["choices"] == inline.json()["choices"]
    endless = capped.images.add("/endless.png", chunked_forever=True, content_type="image/png")
    slow = capped.images.add_image("slow.png", png, drip=0.5)  # 0.5 s a byte: past the 1 s deadline
    missing = capped.images.base + "/missing.png"
    for bad in (endless, slow, missing):
        assert_error(post(capped, ask([{"type": "image_url", "image_url": {"url": bad}}])), 400)


def test_remote_and_local_images_are_refused_by_default(server):
    for url in ("http://127.0.0.1:9/a.png", "a.png", "file:///etc/hostname"):
        response = post(server, ask([{"type": "image_url", "image_url": {"url": url}}]))
        error = assert_error(response, 400)
        assert "data URL" in error["message"]


def test_api_key_is_required_when_set(serve_model, monkeypatch):
    monkeypatch.setenv("MGPT4_API_KEY", "s3cret")
    with start_server(serve_model, api_key="s3cret") as keyed:
        assert keyed.chat([{"role": "user", "content": "hi"}], max_tokens=2).choices
        assert [m.id for m in keyed.client.models.list().data] == ["micro"]
        wrong = openai.OpenAI(base_url=f"{keyed.url}/v1", api_key="nope", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.chat.completions.create(model="micro", messages=[{"role": "user", "content": "hi"}])
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
        error = assert_error(post(keyed, ask("hi")), 401, code="invalid_api_key")  # no header at all
        assert "Bearer" in error["message"]
        assert httpx.get(f"{keyed.url}/health").status_code == 200  # health stays open for probes


def test_api_key_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("MGPT4_API_KEY", "from-env")
    assert ServeConfig().resolved_api_key() == "from-env"
    assert ServeConfig(api_key="flag").resolved_api_key() == "flag"
    monkeypatch.delenv("MGPT4_API_KEY")
    assert ServeConfig().resolved_api_key() is None
    assert ServeConfig().host == "127.0.0.1"


@pytest.mark.parametrize(
    "fields",
    [
        {"max_batch_size": 0},
        {"port": 70000},
        {"default_temperature": 3.0},
        {"allow_local_images": "/nonexistent"},
    ],
)
def test_bad_serve_config_is_a_config_error(fields):
    with pytest.raises(ConfigError, match=next(iter(fields))):
        ServeConfig(**fields).validate()


def test_missing_server_extra_names_the_install_command(monkeypatch):
    import sys

    from mgpt4 import serve
    from mgpt4.errors import UsageError

    monkeypatch.setitem(sys.modules, "uvicorn", None)
    with pytest.raises(UsageError, match=r"pip install 'mgpt4\[serve\]'"):
        serve.require_serve_extra()
