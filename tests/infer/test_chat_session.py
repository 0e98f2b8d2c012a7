"""ChatSession without a terminal: official prompt, /image, trimming, /set, transcripts, bad input."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from mgpt4.config import GenerateConfig
from mgpt4.conversation import CHAT_SYSTEM, IMAGE_PLACEHOLDER, ChatTurn, chat_prompt
from mgpt4.errors import ConfigError
from mgpt4.infer.chat import ChatGenerateConfig, ChatSession
from mgpt4.infer.loading import load_model
from mgpt4.model.build import read_model_config


class RecordingModel:
    """Wraps the real model and records what ``generate`` was asked, so prompts can be checked."""

    def __init__(self, model):
        self.model = model
        self.calls = []

    def __getattr__(self, name):
        return getattr(self.model, name)

    def generate(self, prompts, images, config, streamer=None):
        self.calls.append((prompts, images, config))
        return self.model.generate(prompts, images, config, streamer=streamer)


@pytest.fixture(scope="module")
def model(micro_model_dir):
    return load_model(read_model_config(micro_model_dir), micro_model_dir, "cpu")


@pytest.fixture
def images(tmp_path):
    paths = []
    for colour in ("red", "blue"):
        path = tmp_path / f"{colour}.png"
        Image.new("RGB", (40, 30), colour).save(path)
        paths.append(str(path))
    return paths


def session_for(model, **generate) -> tuple[ChatSession, RecordingModel]:
    recorder = RecordingModel(model)
    config = GenerateConfig(do_sample=False, max_new_tokens=6, **generate)
    return ChatSession(recorder, config), recorder


def test_chat_defaults_follow_the_official_demo():
    config = ChatGenerateConfig()
    assert (config.do_sample, config.top_p, config.temperature, config.repetition_penalty) == (
        True,
        0.9,
        1.0,
        1.05,
    )
    assert (config.max_new_tokens, config.max_length) == (300, 2000)


def test_turns_use_the_official_template_and_image_switch_adds_a_slot(model, images):
    session, recorder = session_for(model)
    session.show_image(images[0])
    first = session.handle("what colour is it?")
    assert first.kind == "answer" and first.tokens <= 6
    assert session.handle(f"/image {images[1]}").kind == "message"
    session.handle("and now?")
    prompts, image_groups, _ = recorder.calls[-1]
    expected = chat_prompt(
        [ChatTurn("what colour is it?", first.text, images[0]), ChatTurn("and now?", image=images[1])]
    )
    assert prompts == [expected]
    assert expected.startswith(
        CHAT_SYSTEM + "###Human: <Img><ImageHere></Img> what colour is it?###Assistant: "
    )
    assert expected.endswith("###Human: <Img><ImageHere></Img> and now?###Assistant: ")
    assert image_groups[0].shape == (2, 3, 64, 64)  # both images, in order
    red, blue = image_groups[0]
    assert red.mean() != blue.mean()


def test_text_only_chat_and_reset(model):
    session, recorder = session_for(model)
    assert session.handle("hello?").kind == "answer"
    assert IMAGE_PLACEHOLDER not in recorder.calls[-1][0][0]
    assert session.handle("/reset").kind == "message"
    assert session.turns == [] and session.pending_image is None


def test_history_is_trimmed_from_the_oldest_turn(model, images):
    session, recorder = session_for(model)
    session.show_image(images[0])
    for question in ("first question about the image", "second", "third", "fourth"):
        session.handle(question)
    full = session.prompt_length(session.turns + [ChatTurn("fifth")])
    # Leave room for about two turns: the oldest ones (and the first image turn) must go.
    session.config = GenerateConfig(do_sample=False, max_new_tokens=6, max_length=full + 6 - 30)
    reply = session.handle("fifth")
    assert reply.kind == "answer" and "trimmed" in reply.note
    sent = recorder.calls[-1][0][0]
    assert "first question" not in sent and sent.endswith("fifth###Assistant: ")
    kept = session.fit_context(session.turns[:-1] + [ChatTurn("fifth")])[0]
    assert session.prompt_length(kept) + 6 <= session.config.max_length
    # The image introduced by the dropped first turn is still shown with the first kept turn.
    assert sent.count(IMAGE_PLACEHOLDER) == 1 and recorder.calls[-1][1][0].shape[0] == 1
    assert len(session.turns) == 5  # the transcript keeps everything


def test_set_validates_keys_and_values(model):
    session, _ = session_for(model)
    assert session.handle("/set temperature 0.7").text == "temperature = 0.7"
    assert session.config.temperature == 0.7
    assert session.handle("/set num_beams 2").kind == "message" and session.config.num_beams == 2
    bad_key = session.handle("/set temprature 1")
    assert bad_key.kind == "error" and "temperature" in bad_key.text
    bad_value = session.handle("/set max_new_tokens lots")
    assert bad_value.kind == "error" and "max_new_tokens" in bad_value.text
    with pytest.raises(ConfigError):
        session.set_option("top_k", "5")
    assert "temperature=0.7" in session.handle("/set").text


def test_bad_inputs_are_messages_and_the_session_goes_on(model, tmp_path):
    session, _ = session_for(model)
    text_file = tmp_path / "notes.txt"
    text_file.write_text("hi")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    assert session.handle("   ").kind == "notice"
    for line, fragment in [
        ("/image missing.png", "no such image"),
        (f"/image {text_file}", "unsupported file type"),
        (f"/image {broken}", "cannot read image"),
        ("/image", "needs a path"),
        ("/frobnicate", "unknown command"),
    ]:
        reply = session.handle(line)
        assert reply.kind == "error" and fragment in reply.text, (line, reply)
    assert session.pending_image is None
    assert session.handle("still there?").kind == "answer"
    assert session.handle("/exit").kind == "exit"


def test_transcript_roundtrip_and_missing_image_warning(model, images, tmp_path):
    session, _ = session_for(model)
    session.show_image(images[0])
    session.handle("what is it?")
    session.handle(f"/image {images[1]}")
    saved = session.save(str(tmp_path / "t" / "chat.json"))
    data = json.loads(saved.read_text())
    assert data["turns"][0]["image"] == images[0] and data["pending_image"] == images[1]
    assert not list(saved.parent.glob("*.tmp"))

    resumed, recorder = session_for(model)
    assert resumed.load(str(saved)) == []
    assert [t.question for t in resumed.turns] == ["what is it?"] and resumed.pending_image == images[1]
    resumed.handle("and this one?")
    assert recorder.calls[-1][0][0].count(IMAGE_PLACEHOLDER) == 2

    data["turns"][0]["image"] = str(tmp_path / "gone.png")
    data["pending_image"] = None
    saved.write_text(json.dumps(data))
    warnings = session_for(model)[0].load(str(saved))
    assert len(warnings) == 1 and "gone.png" in warnings[0]
    (tmp_path / "junk.json").write_text("[1, 2]")
    assert session.handle(f"/save {tmp_path / 'ok.json'}").kind == "message"
    with pytest.raises(Exception, match="not a chat transcript"):
        session.load(str(tmp_path / "junk.json"))


def test_streamed_text_ends_as_the_answer(model, images):
    session, _ = session_for(model)
    session.show_image(images[0])
    seen: list[str] = []
    reply = session.handle("describe it", on_text=seen.append)
    assert seen, "the streamer reported no text"
    assert all(later.startswith(earlier) for earlier, later in zip(seen, seen[1:], strict=False))
    assert reply.text == seen[-1].split("###")[0].split("Assistant:")[-1].strip()
    assert 0 < len(seen) <= reply.tokens + 3  # one report per token at most (+ the stop string's)
