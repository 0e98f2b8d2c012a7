"""OpenAI messages → the official chat template (the same ``chat_prompt`` that ``mgpt4 chat`` uses), and
OpenAI sampling parameters → decoding settings and batch keys."""

from __future__ import annotations

import json

import pytest

from mgpt4.conversation import CHAT_SYSTEM, IMAGE_SLOT, ChatTurn, chat_prompt
from mgpt4.serve.config import ServeConfig
from mgpt4.serve.messages import build_chat_prompt, decoding_from_request
from mgpt4.serve.protocol import ApiError, parse_request


def messages(*items) -> list:
    return parse_request(json.dumps({"model": "m", "messages": list(items)}).encode()).messages


def image(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def test_multi_turn_with_an_image_is_the_official_chat_prompt():
    chat = build_chat_prompt(
        messages(
            {"role": "user", "content": [{"type": "text", "text": "what is it?"}, image("data:a")]},
            {"role": "assistant", "content": "a circle"},
            {"role": "user", "content": "which colour?"},
        ),
        "vicuna0",
        max_images=4,
    )
    expected = chat_prompt([ChatTurn("what is it?", "a circle", image="a"), ChatTurn("which colour?")])
    assert chat.prompt == expected
    assert chat.prompt == (
        CHAT_SYSTEM + "###Human: <Img><ImageHere></Img> what is it?###Assistant: a circle###"
        "Human: which colour?###Assistant: "
    )
    assert chat.image_urls == ["data:a"] and chat.image_params == ["messages[0].content[1].image_url.url"]


def test_consecutive_user_messages_are_one_turn_like_the_official_demo():
    # MG's demo: upload_img adds "<Img><ImageHere></Img>", ask() appends the question with a space.
    chat = build_chat_prompt(
        messages({"role": "user", "content": [image("u1")]}, {"role": "user", "content": "describe it"}),
        "vicuna0",
        4,
    )
    assert chat.prompt.endswith("###Human: <Img><ImageHere></Img> describe it###Assistant: ")


def test_several_images_in_one_turn_each_get_a_slot_in_order():
    chat = build_chat_prompt(
        messages(
            {"role": "user", "content": [image("u1"), {"type": "text", "text": "compare"}, image("u2")]}
        ),
        "vicuna0",
        4,
    )
    assert chat.prompt.endswith(f"###Human: {IMAGE_SLOT} {IMAGE_SLOT} compare###Assistant: ")
    assert chat.image_urls == ["u1", "u2"]


def test_a_system_message_replaces_the_template_system_text():
    chat = build_chat_prompt(
        messages({"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}), "vicuna0", 4
    )
    assert chat.prompt == "Be brief.###Human: hi###Assistant: "


def test_llama2_style_uses_its_own_template():
    chat = build_chat_prompt(
        messages({"role": "user", "content": [image("u"), {"type": "text", "text": "q"}]}), "llama2", 4
    )
    assert chat.prompt == CHAT_SYSTEM + "<s>[INST] <Img><ImageHere></Img> q [/INST] "


@pytest.mark.parametrize(
    "params,expected",
    [
        ({"temperature": 0}, dict(greedy=True, seed=None)),
        ({"temperature": 0, "seed": 5, "top_p": 0.5}, dict(greedy=True, seed=None, top_p=1.0)),
        ({}, dict(greedy=False, temperature=1.0, top_p=0.9)),  # the official demo's sampling
        (
            {"temperature": 0.7, "top_p": 0.8, "seed": 3},
            dict(greedy=False, temperature=0.7, top_p=0.8, seed=3),
        ),
        ({"stop": "END"}, dict(stops=("###", "END"))),
        (
            {"stop": ["###", "a"], "max_completion_tokens": 9, "max_tokens": 4},
            dict(stops=("###", "a"), max_tokens=9),
        ),
    ],
)
def test_openai_parameters_map_to_decoding(params, expected):
    request = parse_request(
        json.dumps({"model": "m", "messages": [{"role": "user", "content": "x"}], **params}).encode()
    )
    decoding = decoding_from_request(request, ServeConfig())
    for name, value in expected.items():
        assert getattr(decoding, name) == value, name


def test_batch_keys_group_compatible_requests_only():
    def key(request_id, **params):
        body = {"model": "m", "messages": [{"role": "user", "content": "x"}], **params}
        return decoding_from_request(parse_request(json.dumps(body).encode()), ServeConfig()).batch_key(
            request_id
        )

    assert key("a", temperature=0) == key("b", temperature=0, max_tokens=5, stop="x")
    assert key("a", temperature=0.5) == key("b", temperature=0.5) != key("c", temperature=0.6)
    assert key("a", temperature=0.5, seed=1) != key("b", temperature=0.5, seed=1)  # seeded: alone


def test_too_many_images_across_the_conversation_is_refused():
    with pytest.raises(ApiError, match="at most 2") as caught:
        build_chat_prompt(
            messages(
                {"role": "user", "content": [image("1"), image("2")]},
                {"role": "assistant", "content": "ok"},
                {"role": "user", "content": [image("3")]},
            ),
            "vicuna0",
            max_images=2,
        )
    assert caught.value.status == 400 and caught.value.code == "too_many_images"
