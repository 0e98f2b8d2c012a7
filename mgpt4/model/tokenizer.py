"""Tokenizers: the LLM's own (from its local HF directory) or a small built one for the micro preset.

No hub is reachable, and a micro model trained from scratch needs a tokenizer whose vocabulary fits
its tiny embedding table, so ``build_micro_tokenizer`` trains a byte-level BPE (any text encodes) on a
fixed corpus of the prompt templates and plain English scene words. It is saved into every run
directory, so a run never depends on rebuilding it identically.
"""

from __future__ import annotations

import logging
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from mgpt4.errors import CheckpointError

log = logging.getLogger("mgpt4.model")

# MG minigpt4.py: ``llama_tokenizer.pad_token = "$$"``. Pads are masked out of attention and loss,
# so the id only has to exist.
OFFICIAL_PAD = "$$"

_MICRO_CORPUS_WORDS = """
a an the image picture photo shows there is are one two three shape shapes object objects
circle square triangle star diamond rectangle ellipse hexagon cross ring
red green blue yellow purple orange pink brown black white gray grey cyan magenta
left right top bottom center centre middle upper lower corner side near far next to and
of in on at with background plain light dark small large big medium size colour color
describe this detail detailed take look notice please provide description contents could you
me for what where which how many see can answer question questions give following able
it once provide i you will be to my your yes no not also both each other
continue fix error given paragraph remove repeating sentences meaningless characters english
""".split()


def _micro_corpus() -> list[str]:
    # Local import: conversation.py imports nothing from here, so there is no cycle.
    from mgpt4 import conversation

    lines = [
        conversation.STAGE2_TEMPLATE.format(instruction)
        for instruction in conversation.ALIGNMENT_INSTRUCTIONS
    ]
    lines += [conversation.CHAT_SYSTEM, conversation.CURATE_PROMPT, conversation.FIX_PROMPT]
    lines = lines * 10 + ["###Human: Continue ###Assistant: "] * 10
    # Repeat the word list so frequent scene words become single tokens.
    lines += [" ".join(_MICRO_CORPUS_WORDS)] * 20
    lines += [f"{word}. {word}, {word}" for word in _MICRO_CORPUS_WORDS]
    return lines


def build_micro_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with Llama-style special tokens, deterministic for a given size."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_micro_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """Load a tokenizer saved in a local directory (an LLM folder or a run's ``tokenizer/``)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: tokenizer directory not found")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot load tokenizer ({str(exc).splitlines()[0]})") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = OFFICIAL_PAD
    if tokenizer.bos_token_id is None:
        raise CheckpointError(f"{path}: tokenizer has no BOS token; MiniGPT-4 prompts start with BOS")
    return tokenizer
