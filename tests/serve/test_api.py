"""``mgpt4 serve`` through the official ``openai`` client: plain, streamed, image, multi-turn, models,
health, concurrency (batched answers equal the answers alone), and a client that goes away mid-stream."""

from __future__ import annotations

import concurrent.futures
import json
import urllib.request

import httpx2 as httpx
import pytest
from helpers.loopback_http import make_png
from helpers.serving import data_url, image_message

from mgpt4.config import GenerateConfig
from mgpt4.infer.chat import ChatSession


def chat_answer(model, turns: list[tuple[str, str | None]], max_new_tokens: int = 8) -> list[str]:
    """What ``mgpt4 chat`` answers, greedily: ``turns`` are (question, image path or None)."""
    session = ChatSession(model, GenerateConfig(max_new_tokens=max_new_tokens))
    answers = []
    for question, image in turns:
        if image:
            session.show_image(image)
        answers.append(session.ask(question).text)
    return answers


def test_plain_answer_is_what_chat_answers(server, serve_model):
    reply = server.chat([{"role": "user", "content": "what colour is the sky?"}])
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == chat_answer(serve_model, [("what colour is the sky?", None)])[0]
    assert choice.finish_reason in ("stop", "length")
    assert reply.model == "micro" and reply.id.startswith("chatcmpl-") and reply.object == "chat.completion"
    assert 1 <= reply.usage.completion_tokens <= 8
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    record = server.logs[-1]
    assert record["status"] == 200 and record["batch_size"] == 1 and record["stream"] is False
    assert record["completion_tokens"] == reply.usage.completion_tokens and record["latency_s"] > 0


def test_image_as_base64_data_url_is_seen_like_chat_sees_the_file(server, serve_model, tmp_path):
    png = make_png(96, 80, seed=3)
    path = tmp_path / "shape.png"
    path.write_bytes(png)
    reply = server.chat([image_message("describe the shape", data_url(png))])
    expected = chat_answer(serve_model, [("describe the shape", str(path))])[0]
    assert reply.choices[0].message.content == expected
    # 32 query tokens take the image's place in the prompt.
    text_only = server.chat([{"role": "user", "content": "describe the shape"}])
    image_tokens = serve_model.preset.num_image_tokens
    slot_tokens = len(serve_model.tokenizer("<Img></Img> ", add_special_tokens=False).input_ids)
    assert reply.usage.prompt_tokens >= text_only.usage.prompt_tokens + image_tokens
    assert reply.usage.prompt_tokens <= text_only.usage.prompt_tokens + image_tokens + slot_tokens
    assert server.logs[-2]["images"] == 1


def test_multi_turn_maps_onto_the_chat_template(server, serve_model, tmp_path):
    png = make_png(64, 64, seed=4)
    path = tmp_path / "a.png"
    path.write_bytes(png)
    first, second = chat_answer(serve_model, [("what is it?", str(path)), ("and its colour?", None)])
    messages = [
        image_message("what is it?", data_url(png)),
        {"role": "assistant", "content": first},
        {"role": "user", "content": "and its colour?"},
    ]
    assert server.chat(messages).choices[0].message.content == second


def test_system_message_replaces_the_template_system_text(server):
    question = {"role": "user", "content": "hello"}
    default = server.chat([question])
    custom = server.chat([{"role": "system", "content": "Answer briefly."}, question])
    assert custom.usage.prompt_tokens < default.usage.prompt_tokens  # the long official text is gone


def test_streamed_chunks_add_up_to_the_plain_answer(server):
    messages = [{"role": "user", "content": "tell me about the picture"}]
    plain = server.chat(messages, max_tokens=12)
    chunks = list(server.chat(messages, max_tokens=12, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    finishing = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishing == [plain.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert len({c.id for c in chunks}) == 1 and all(c.object == "chat.completion.chunk" for c in chunks)
    assert server.logs[-1]["stream"] is True


def test_raw_stream_is_server_sent_events_ending_with_done(server):
    messages = [{"role": "user", "content": "hi"}]
    body = {"model": "micro", "messages": messages, "max_tokens": 4, "stream": True}
    request = urllib.request.Request(
        f"{server.url}/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        events = response.read().decode().split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(event.startswith("data: {") for event in events[:-2])


def test_sampling_with_a_seed_repeats_and_stop_strings_cut(server):
    messages = [{"role": "user", "content": "say something"}]
    first = server.chat(messages, temperature=1.3, top_p=0.95, seed=7, max_tokens=10)
    again = server.chat(messages, temperature=1.3, top_p=0.95, seed=7, max_tokens=10)
    assert first.choices[0].message.content == again.choices[0].message.content
    full = server.chat(messages, max_tokens=10).choices[0].message.content
    cut_at = full.strip()[len(full.strip()) // 2 :][:2].strip() or full.strip()[-1]
    stopped = server.chat(messages, max_tokens=10, stop=[cut_at])
    assert stopped.choices[0].finish_reason == "stop"
    assert cut_at not in stopped.choices[0].message.content
    assert full.startswith(stopped.choices[0].message.content)


def test_models_health_and_page(server):
    assert [m.id for m in server.client.models.list().data] == ["micro"]
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok", "model": "micro"}
    page = httpx.get(f"{server.url}/")
    assert page.status_code == 200 and "mgpt4 chat" in page.text and "/v1/chat/completions" in page.text


def test_concurrent_requests_are_batched_and_answer_as_they_do_alone(server):
    requests = [[{"role": "user", "content": f"question {i}: which shapes are there?"}] for i in range(5)] + [
        [image_message(f"look {i}", data_url(make_png(48 + 8 * i, 40, seed=i)))] for i in range(3)
    ]
    alone = [server.chat(messages, max_tokens=10).choices[0].message.content for messages in requests]
    first_batched = len(server.logs)
    with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
        replies = list(pool.map(lambda messages: server.chat(messages, max_tokens=10), requests))
    assert [r.choices[0].message.content for r in replies] == alone
    sizes = [record["batch_size"] for record in server.logs[first_batched:]]
    assert len(sizes) == len(requests) and max(sizes) >= 2, sizes  # they did share generate calls


def test_a_client_that_leaves_mid_stream_frees_its_row(server):
    messages = [{"role": "user", "content": "describe everything you see in great detail"}]
    long = 150
    # Premise: left alone, this answer runs all `long` tokens.
    assert server.chat(messages, max_tokens=long).choices[0].finish_reason == "length"
    body = {"model": "micro", "messages": messages, "max_tokens": long, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        received = [next(lines) for _ in range(6)]  # role chunk and two content chunks (+ blank lines)
    assert any('"content"' in line for line in received)
    # The next request is answered: the abandoned row did not hold its batch for 150 tokens.
    after = server.chat([{"role": "user", "content": "next"}], max_tokens=4)
    assert after.choices[0].message.content is not None
    cancelled = [r for r in server.logs if r.get("finish_reason") == "cancelled"]
    assert len(cancelled) == 1 and cancelled[0]["status"] == 499
    assert 2 <= cancelled[0]["completion_tokens"] < long, cancelled[0]


@pytest.mark.parametrize("path", ["/v1/nothing", "/v2/chat/completions"])
def test_unknown_paths_get_openai_style_404(server, path):
    response = httpx.post(f"{server.url}{path}", json={})
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
