"""Prompt templates, ``<ImageHere>`` splicing and stop-string handling (shared/OFFICIAL.md §5).

Training and chat use *different* strings on purpose, as the official code does:
stage 2 trains on ``###Human: {instruction} ###Assistant: `` (spaces around ``###``), while the chat
demo sends a system text and ``###Human: … {question}###Assistant: `` (no space before ``###``).
"""

from __future__ import annotations

import dataclasses
import random

IMAGE_PLACEHOLDER = "<ImageHere>"
IMAGE_SLOT = "<Img><ImageHere></Img>"
STOP_STRING = "###"

# MG train_configs/minigpt4_stage2_finetune.yaml prompt_template.
STAGE2_TEMPLATE = "###Human: {} ###Assistant: "

# MG prompts/alignment.txt, one drawn per batch.
ALIGNMENT_INSTRUCTIONS = (
    f"{IMAGE_SLOT} Describe this image in detail.",
    f"{IMAGE_SLOT} Take a look at this image and describe what you notice.",
    f"{IMAGE_SLOT} Please provide a detailed description of the picture.",
    f"{IMAGE_SLOT} Could you describe the contents of this image for me?",
)

# MG conversation.py CONV_VISION_Vicuna0.system.
CHAT_SYSTEM = (
    "Give the following image: <Img>ImageContent</Img>. You will be able to see the image once I "
    "provide it to you. Please answer my questions."
)

# MiniGPT-4 paper §3.3: the stage-1 model is asked for a detailed description; short answers
# (< 80 tokens) get a "Continue" turn.
CURATE_PROMPT = (
    f"###Human: {IMAGE_SLOT} Describe this image in detail. Give as many details as possible. "
    "Say everything you see. ###Assistant: "
)
CONTINUE_TURN = "###Human: Continue ###Assistant: "
CONTINUE_MIN_TOKENS = 80

# MiniGPT-4 paper §3.3: the post-processing prompt given to the fixing LLM.
FIX_PROMPT = (
    "Fix the error in the given paragraph. Remove any repeating sentences, meaningless characters, "
    "not English sentences, and so on. Remove unnecessary repetition. Rewrite any incomplete sentences. "
    "Return directly the results without explanation. Return directly the input paragraph if it is "
    "already correct without explanation."
)


def stage1_prompt() -> str:
    """Stage 1 has no text prompt: the sequence is ``[BOS] image caption``."""
    return IMAGE_PLACEHOLDER


def stage2_prompt(instruction: str, template: str = STAGE2_TEMPLATE) -> str:
    """Wrap one alignment instruction in the stage-2 training template."""
    return template.format(instruction)


def draw_instruction(rng: random.Random) -> str:
    """One alignment instruction, drawn the way MG draws one per batch."""
    return rng.choice(ALIGNMENT_INSTRUCTIONS)


def split_at_images(prompt: str) -> list[str]:
    """Text segments around each ``<ImageHere>``: k placeholders give k + 1 segments."""
    return prompt.split(IMAGE_PLACEHOLDER)


def clean_answer(text: str, stops: tuple[str, ...] | list[str] = (STOP_STRING,)) -> str:
    """Post-process generated text like the official chat: cut at the stop string, drop a role prefix."""
    for stop in stops:
        text = text.split(stop)[0]
    return text.split("Assistant:")[-1].strip()


@dataclasses.dataclass
class ChatTurn:
    """One exchange; ``image`` marks the turn where a (new) image was shown."""

    question: str
    answer: str | None = None
    image: str | None = None


def chat_prompt(turns: list[ChatTurn], style: str = "vicuna0") -> str:
    """The official chat prompt for a conversation whose last turn awaits its answer.

    The image slot goes into the user message of every turn that introduced an image, as MG's
    ``upload_img`` does; the model's ``embed_prompt`` then splices one image per placeholder.
    """
    if style == "llama2":
        # MG CONV_VISION_LLama2: roles "<s>[INST] " / " [/INST] ", sep "".
        text = CHAT_SYSTEM
        for turn in turns:
            text += "<s>[INST] " + _user_message(turn) + " [/INST] "
            if turn.answer is not None:
                text += turn.answer
        return text
    text = CHAT_SYSTEM + STOP_STRING
    for turn in turns:
        text += "Human: " + _user_message(turn) + STOP_STRING + "Assistant: "
        if turn.answer is not None:
            text += turn.answer + STOP_STRING
    return text


def _user_message(turn: ChatTurn) -> str:
    return f"{IMAGE_SLOT} {turn.question}" if turn.image is not None else turn.question
