"""``RowText``: per-row incremental decoding — shown text never takes anything back, never shows half a
character or the start of a stop string, and ends like ``clean_answer`` cuts the full text."""

from __future__ import annotations

import pytest

from mgpt4.conversation import clean_answer
from mgpt4.model.tokenizer import build_micro_tokenizer
from mgpt4.serve.batcher import RowText


@pytest.fixture(scope="module")
def tokenizer():
    return build_micro_tokenizer()


def feed(tokenizer, text: str, stops=("###",), max_tokens: int = 1000, eos: bool = False):
    row = RowText(tokenizer, stops, max_tokens, tokenizer.eos_token_id)
    ids = tokenizer(text, add_special_tokens=False).input_ids + ([tokenizer.eos_token_id] if eos else [])
    deltas = [row.add(token) for token in ids if not row.done]
    return row, deltas


@pytest.mark.parametrize(
    "text",
    [
        " a red circle at the top###Human: more",
        "  spaced out answer  ",
        "日本語のテキスト and ünïcödé ✓ 🙂 mixed",
        "ends with a hash # and ## but no stop",
    ],
)
def test_deltas_add_up_to_the_clean_answer_and_never_take_back(tokenizer, text):
    row, deltas = feed(tokenizer, text, eos=True)
    assert "".join(deltas) == clean_answer(text) == row.shown
    assert all("\ufffd" not in delta and "###" not in delta for delta in deltas)
    assert row.finish_reason == "stop"


def test_multi_byte_characters_split_over_tokens_wait_for_their_last_byte(tokenizer):
    emoji = "🙂"
    ids = tokenizer(emoji, add_special_tokens=False).input_ids
    assert len(ids) > 1  # byte-level BPE: the emoji's 4 bytes are several tokens in the micro vocabulary
    row = RowText(tokenizer, ("###",), 100, tokenizer.eos_token_id)
    assert [row.add(token) for token in ids[:-1]] == [""] * (len(ids) - 1)
    assert row.add(ids[-1]) == emoji


def test_a_possible_stop_string_is_held_back_until_decided(tokenizer):
    row = RowText(tokenizer, ("###", "STOP"), 100, tokenizer.eos_token_id)
    shown = ""
    for token in tokenizer("red #", add_special_tokens=False).input_ids:
        shown += row.add(token)
    assert shown == "red"  # "#" may begin "###"; the space before it may end the answer
    for token in tokenizer("# blue ST", add_special_tokens=False).input_ids:
        shown += row.add(token)
    assert shown == "red ## blue"
    for token in tokenizer("OP and more", add_special_tokens=False).input_ids:
        shown += row.add(token)
    assert shown == "red ## blue" and row.finish_reason == "stop"


def test_max_tokens_ends_the_row_with_length(tokenizer):
    row, deltas = feed(tokenizer, "one two three four five six seven", max_tokens=3)
    assert row.finish_reason == "length" and len(row.ids) == 3
    assert "".join(deltas) == tokenizer.decode(row.ids).strip()
    assert row.add(tokenizer("more", add_special_tokens=False).input_ids[0]) == ""  # done rows ignore tokens
