"""Pretrain the micro LLM on caption and chat-template text alone; soft word tokens fill the image slot.

What stands in for the image. A real LLM has read countless texts that describe a scene and then talk
about it, so projected image tokens that look like the right words steer it. The micro LLM gets that
habit from its corpus: every example has an image slot of ``num_image_tokens`` positions (where
MiniGPT-4 splices the image), and each position holds a *soft token* mixed from the LLM's own word
embeddings (so the words learn from it too):

- an object's words (colour + shape + position words: ``red + circle + top + left``) on a random 2-6
  of the positions, blended with ``background`` at a random strength (a partly covered patch);
- ``background`` on the others; then Gaussian noise on every position.

Which positions an object takes is random, so the LLM learns to read the slot in any arrangement;
nothing in the corpus was made from pixels. The texts after the slot are the data set's grammar in
the two formats MiniGPT-4 trains on: stage 1's ``[BOS] <slot> caption\\n`` and stage 2's
``###Human: <Img><slot></Img> instruction ###Assistant: description###`` (with the alignment
instructions, the curation prompt and the chat system text), assembled exactly as
``MiniGPT4.forward`` does. Stage 1 then only has to learn a projection that writes such tokens from
the frozen ViT's patches.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Callable

import numpy as np
import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerBase

from mgpt4 import conversation
from mgpt4.config import field
from mgpt4.data import synthetic
from mgpt4.model.build import llama_config
from mgpt4.model.minigpt4 import IGNORE_INDEX
from mgpt4.model.presets import Preset
from mgpt4.model.tokenizer import build_micro_tokenizer
from mgpt4.train.data import STAGE1_END

BACKGROUND = "background"


@dataclasses.dataclass
class LanguagePretrainConfig:
    """Settings of the micro LLM pretraining."""

    # Measured: after 400 steps the LLM already names every attribute right from noisy slot tokens
    # (200 held-out scenes, both formats); 800 leaves a margin.
    steps: int = field(800, doc="optimizer steps")
    batch_size: int = field(32, doc="texts per step")
    lr: float = field(2e-3, doc="peak AdamW learning rate (linear warmup, cosine to lr/10)")
    warmup_steps: int = field(100, doc="linear warmup steps")
    weight_decay: float = field(0.05, doc="AdamW weight decay")
    chat_fraction: float = field(0.5, doc="share of texts in the stage-2 chat template (the rest: captions)")
    slot_noise: float = field(0.3, doc="std of the noise on slot tokens, relative to the embeddings' RMS")
    max_txt_len: int = field(160, doc="max target tokens (the stage-2 recipe's)")
    seed: int = field(0, doc="seed of the initialisation and the corpus")


# --------------------------------------------------------------------------------------------------
# the corpus
# --------------------------------------------------------------------------------------------------


def random_scene(rng: random.Random, two_shape_fraction: float = 0.3) -> dict:
    """Attributes of a scene drawn like the shapes data set's (no image is drawn)."""
    if rng.random() < two_shape_fraction:
        positions = [name for name, _, _ in rng.choice(synthetic.PAIR_LAYOUTS)]
    else:
        positions = [rng.choice(synthetic.GRID)[0]]
    shapes = [{"shape": rng.choice(synthetic.SHAPES), "colour": rng.choice(list(synthetic.COLOURS)),
               "position": position} for position in positions]  # fmt: skip
    return {"count": len(shapes), "shapes": shapes}


@dataclasses.dataclass
class Example:
    """One text: the prompt (with one ``<ImageHere>``), its target, and the scene the slot shows."""

    scene: dict
    prompt: str
    target: str


def make_example(rng: random.Random, chat_fraction: float, end_sym: str) -> Example:
    """A stage-1 caption or a stage-2 chat exchange about a random scene."""
    scene = random_scene(rng)
    if rng.random() >= chat_fraction:
        return Example(scene, conversation.stage1_prompt(), synthetic.caption_for(scene) + STAGE1_END)
    instruction = rng.choice(conversation.ALIGNMENT_INSTRUCTIONS)
    kind = rng.random()
    if kind < 0.7:  # stage-2 training, as InstructionBatches builds it
        prompt = conversation.stage2_prompt(instruction)
    elif kind < 0.85:  # the paper's curation prompt
        prompt = conversation.CURATE_PROMPT
    else:  # `mgpt4 chat`'s first turn
        question = instruction.removeprefix(conversation.IMAGE_SLOT).strip()
        prompt = conversation.chat_prompt([conversation.ChatTurn(question, image="image")])
    return Example(scene, prompt, synthetic.detailed_for(scene) + end_sym)


class SlotWriter:
    """Mixing weights over the vocabulary for the image slot: (B, T, V) per batch of scenes."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, num_tokens: int) -> None:
        self.num_tokens, self.vocab = num_tokens, len(tokenizer)
        words = [
            *synthetic.COLOURS,
            *synthetic.SHAPES,
            "top",
            "bottom",
            "left",
            "right",
            "center",
            BACKGROUND,
        ]
        self.ids = {}
        for word in words:
            ids = tokenizer(" " + word, add_special_tokens=False).input_ids
            if len(ids) != 1:
                raise AssertionError(f"the micro tokenizer must hold ' {word}' as one token, got {ids}")
            self.ids[word] = ids[0]

    def object_words(self, shape: dict) -> list[int]:
        return [
            self.ids[shape["colour"]],
            self.ids[shape["shape"]],
            *map(self.ids.get, shape["position"].split()),
        ]

    def weights(self, scenes: list[dict], rng: random.Random) -> torch.Tensor:
        """(B, T, V): row t of scene b says which words position t mixes, and how much."""
        mix = np.zeros((len(scenes), self.num_tokens, self.vocab), dtype=np.float32)
        background = self.ids[BACKGROUND]
        for row, scene in enumerate(scenes):
            mix[row, :, background] = 1.0
            free = list(range(self.num_tokens))
            rng.shuffle(free)
            for shape in scene["shapes"]:
                count = rng.randint(2, 6)  # a shape covers ~2-6 of the 16 merged-patch tokens
                taken, free = free[:count], free[count:]
                for position in taken:
                    strength = rng.uniform(0.3, 1.0)
                    mix[row, position, background] = 1.0 - strength
                    for word in self.object_words(shape):
                        mix[row, position, word] += strength
        return torch.from_numpy(mix)


# --------------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------------


def build_llm(preset: Preset) -> tuple[LlamaForCausalLM, PreTrainedTokenizerBase]:
    """A randomly initialised micro Llama of the preset's shape, sized to the micro tokenizer."""
    tokenizer = build_micro_tokenizer(preset.llm.vocab_size)
    config = llama_config(preset.llm, len(tokenizer), "sdpa")
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    return LlamaForCausalLM(config), tokenizer


def slot_tokens(
    llm: LlamaForCausalLM, mix: torch.Tensor, noise: float, generator: torch.Generator
) -> torch.Tensor:
    """Soft tokens (B, T, H) from mixing weights (B, T, V) over the LLM's input embeddings, plus noise."""
    table = llm.get_input_embeddings().weight  # (V, H)
    slots = mix @ table  # (B, T, H)
    scale = table.detach().pow(2).mean().sqrt()
    return slots + noise * scale * torch.randn(slots.shape, generator=generator)


def text_loss(
    llm: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[Example],
    slots: torch.Tensor,
    max_txt_len: int,
) -> torch.Tensor:
    """Mean cross-entropy on the targets, the sequence built as ``MiniGPT4.forward`` builds it.

    Each prompt segment is tokenized on its own, BOS first, the slot (T, H) spliced at ``<ImageHere>``,
    then the target (truncated to ``max_txt_len`` tokens); loss on target tokens only.
    """
    table = llm.get_input_embeddings()

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False).input_ids if text else []

    rows, labels = [], []
    for example, slot in zip(examples, slots, strict=True):
        before, after = conversation.split_at_images(example.prompt)
        prefix, suffix = [tokenizer.bos_token_id, *ids(before)], ids(after)
        target = ids(example.target)[:max_txt_len]
        embed = [table(torch.tensor(prefix)), slot, table(torch.tensor(suffix + target, dtype=torch.long))]
        rows.append(torch.cat(embed))  # (L, H)
        labels.append(torch.tensor([IGNORE_INDEX] * (len(prefix) + len(slot) + len(suffix)) + target))
    inputs = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)  # (B, L, H), zeros on the right
    targets = torch.nn.utils.rnn.pad_sequence(labels, batch_first=True, padding_value=IGNORE_INDEX)
    lengths = torch.tensor([len(row) for row in rows])
    attention_mask = (torch.arange(inputs.shape[1])[None, :] < lengths[:, None]).long()  # (B, L)
    return llm(inputs_embeds=inputs, attention_mask=attention_mask, labels=targets, use_cache=False).loss


def pretrain_language(
    cfg: LanguagePretrainConfig,
    preset: Preset,
    on_step: Callable[[int, torch.nn.Module, float], None] | None = None,
    stop_after: int | None = None,
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerBase]:
    """Train the micro LLM on the corpus above; returns it (eval mode) and its tokenizer.

    Args:
        cfg: sizes and optimiser settings.
        preset: the model shape (LLM size, image tokens, stage-2 end symbol).
        on_step: called after every step with (steps done, the LLM, loss).
        stop_after: stop after this many steps (the schedule still spans ``cfg.steps``).
    """
    torch.manual_seed(cfg.seed)
    llm, tokenizer = build_llm(preset)
    writer = SlotWriter(tokenizer, preset.num_image_tokens)
    rng = random.Random(f"mgpt4-foundation-llm:{cfg.seed}")
    noise = torch.Generator().manual_seed(cfg.seed)
    optimizer = torch.optim.AdamW(llm.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    llm.train()
    for step in range(min(cfg.steps, stop_after or cfg.steps)):
        for group in optimizer.param_groups:
            group["lr"] = _schedule(cfg, step)
        examples = [
            make_example(rng, cfg.chat_fraction, preset.stage2_end_sym) for _ in range(cfg.batch_size)
        ]
        mix = writer.weights([example.scene for example in examples], rng)
        slots = slot_tokens(llm, mix, cfg.slot_noise, noise)
        loss = text_loss(llm, tokenizer, examples, slots, cfg.max_txt_len)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(llm.parameters(), 1.0)
        optimizer.step()
        if on_step is not None:
            on_step(step + 1, llm, loss.item())
    return llm.eval(), tokenizer


def _schedule(cfg: LanguagePretrainConfig, step: int) -> float:
    """Linear warmup, then cosine from ``lr`` to ``lr / 10``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
