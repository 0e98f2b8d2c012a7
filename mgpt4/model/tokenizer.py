"""Tokenizers: the LLM's own (from its local HF directory) or a small built one for the micro preset.

An LLM folder with a sentencepiece ``tokenizer.model`` (Vicuna v0, Llama-2-chat) is read with
``OfficialLlamaTokenizer``: the rules of the slow ``LlamaTokenizer`` that the official code loads
(``use_fast=False``, transformers 4.30, shared/OFFICIAL.md §4, §11). transformers 5 only offers the
fast tokenizer, which encodes differently (see the class docstring). Other folders use ``AutoTokenizer``.

No hub is reachable, and a micro model trained from scratch needs a tokenizer whose vocabulary fits
its tiny embedding table, so ``build_micro_tokenizer`` trains a byte-level BPE (any text encodes) on a
fixed corpus of the prompt templates and plain English scene words. It is saved into every run
directory, so a run never depends on rebuilding it identically.
"""

from __future__ import annotations

import importlib.util
import logging
import re
import shutil
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AddedToken,
    AutoTokenizer,
    PreTrainedTokenizer,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

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


SENTENCEPIECE_FILE = "tokenizer.model"


class OfficialLlamaTokenizer(PreTrainedTokenizer):
    """The slow ``LlamaTokenizer`` of transformers 4.30, the one the official MiniGPT-4 code runs.

    Encoding: text is split at the special tokens known when the file is loaded (``<unk>``, ``<s>``,
    ``</s>``, plus any added tokens) with no stripping around them, and every other piece is encoded on
    its own by sentencepiece, dummy prefix included. So each separately encoded text gets a leading
    ``▁``: ``' The'`` → ``['▁', '▁The']`` and ``'<s>[INST]'`` → ``['<s>', '▁', '<0x5B>', …]``, where
    transformers 5's fast tokenizer (``legacy=False``) gives ``['▁The']`` and ``['<s>', '<0x5B>', …]``.
    A pad token set later (MiniGPT-4's ``$$``) is not split out of text, as in 4.30.

    Decoding: runs of ordinary pieces go through sentencepiece's own decoder, so byte-fallback pieces
    that do not form valid UTF-8 keep their valid bytes (one U+FFFD per invalid sequence, where the
    fast decoder puts one U+FFFD per byte); special tokens are written out (or skipped) in between.
    """

    vocab_files_names = {"vocab_file": SENTENCEPIECE_FILE}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(
        self,
        vocab_file: str,
        unk_token: str | AddedToken = "<unk>",
        bos_token: str | AddedToken = "<s>",
        eos_token: str | AddedToken = "</s>",
        pad_token: str | AddedToken | None = None,
        add_bos_token: bool = True,
        add_eos_token: bool = False,
        **kwargs,
    ) -> None:
        import sentencepiece  # only official LLM folders need it

        self.vocab_file = str(vocab_file)
        self.sp_model = sentencepiece.SentencePieceProcessor(model_file=self.vocab_file)
        self._inside_text_model = None
        self.add_bos_token, self.add_eos_token = add_bos_token, add_eos_token
        for name in ("legacy", "add_prefix_space", "sp_model_kwargs", "use_default_system_prompt"):
            kwargs.pop(name, None)  # 4.30 had none of these switches: behaviour is always "legacy"
        kwargs.setdefault("clean_up_tokenization_spaces", False)  # 4.30 LlamaTokenizer default
        super().__init__(
            unk_token=_unstripped(unk_token),
            bos_token=_unstripped(bos_token),
            eos_token=_unstripped(eos_token),
            pad_token=_unstripped(pad_token),
            **kwargs,
        )
        # Frozen now: 4.30 only kept tokens registered at load time out of sentencepiece.
        self._unsplit = frozenset(self.all_special_tokens) | frozenset(self._added_beyond_vocab().values())
        alternatives = "|".join(re.escape(t) for t in sorted(self._unsplit, key=len, reverse=True))
        self._unsplit_pattern = re.compile(f"({alternatives})")

    # --- vocabulary -------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.sp_model.get_piece_size()

    def get_vocab(self) -> dict[str, int]:
        vocab = {self.sp_model.id_to_piece(i): i for i in range(self.vocab_size)}
        vocab.update(self._added_beyond_vocab_by_token())
        return vocab

    def _added_beyond_vocab(self) -> dict[int, str]:
        """Added tokens that sentencepiece does not know (4.30's ``added_tokens_encoder``)."""
        return {i: t.content for i, t in self._added_tokens_decoder.items() if i >= self.vocab_size}

    def _added_beyond_vocab_by_token(self) -> dict[str, int]:
        return {token: index for index, token in self._added_beyond_vocab().items()}

    def _convert_token_to_id(self, token: str) -> int:
        return self.sp_model.piece_to_id(token)

    def _convert_id_to_token(self, index: int) -> str:
        return self.sp_model.id_to_piece(index)

    # --- encoding ---------------------------------------------------------------------------------

    def tokenize(self, text: str, **kwargs) -> list[str]:
        pieces: list[str] = []
        for chunk in self._unsplit_pattern.split(text):
            if chunk in self._unsplit:
                pieces.append(chunk)
            elif chunk:
                pieces.extend(self.sp_model.encode(chunk, out_type=str))
        return pieces

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return self.sp_model.encode(text, out_type=str)

    def encode_inside_text(self, text: str) -> list[int]:
        """Ids of ``text`` as it is spelled inside longer text: sentencepiece without its dummy prefix.

        Llama spells ``###`` as ``▁###`` (835) on its own but ``##`` ``#`` (2277, 29937) after other
        text; MG stops on both.
        """
        if self._inside_text_model is None:
            from sentencepiece import SentencePieceProcessor, sentencepiece_model_pb2  # needs protobuf

            proto = sentencepiece_model_pb2.ModelProto.FromString(self.sp_model.serialized_model_proto())
            proto.normalizer_spec.add_dummy_prefix = False
            self._inside_text_model = SentencePieceProcessor(model_proto=proto.SerializeToString())
        return self._inside_text_model.encode(text)

    def build_inputs_with_special_tokens(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None
    ) -> list[int]:
        bos = [self.bos_token_id] if self.add_bos_token else []
        eos = [self.eos_token_id] if self.add_eos_token else []
        ids = bos + token_ids_0 + eos
        return ids if token_ids_1 is None else ids + bos + token_ids_1 + eos

    def get_special_tokens_mask(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None, already_has_special_tokens=False
    ) -> list[int]:
        if already_has_special_tokens:
            return super().get_special_tokens_mask(token_ids_0, token_ids_1, already_has_special_tokens=True)
        bos, eos = [1] * self.add_bos_token, [1] * self.add_eos_token
        mask = bos + [0] * len(token_ids_0) + eos
        return mask if token_ids_1 is None else mask + bos + [0] * len(token_ids_1) + eos

    # --- decoding ---------------------------------------------------------------------------------

    def _decode(
        self,
        token_ids: int | list[int],
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
        spaces_between_special_tokens: bool = True,
        **kwargs,
    ) -> str:
        """4.30 ``PreTrainedTokenizer._decode``: added tokens stand apart, the rest is sentencepiece text."""
        ids = [token_ids] if isinstance(token_ids, int) else [int(i) for i in token_ids]
        skipped = set(self.all_special_ids) if skip_special_tokens else set()
        added = self._added_beyond_vocab()
        texts: list[str] = []
        run: list[str] = []
        for index in ids:
            if index in skipped:
                continue
            if index in added:
                if run:
                    texts.append(self.convert_tokens_to_string(run))
                    run = []
                texts.append(added[index])
            elif 0 <= index < self.vocab_size:  # ids past the vocabulary (a padded embedding table): none
                run.append(self.sp_model.id_to_piece(index))
        if run:
            texts.append(self.convert_tokens_to_string(run))
        text = (" " if spaces_between_special_tokens else "").join(texts)
        if clean_up_tokenization_spaces is None:
            clean_up_tokenization_spaces = self.clean_up_tokenization_spaces
        return self.clean_up_tokenization(text) if clean_up_tokenization_spaces else text

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        """4.30 ``LlamaTokenizer``: sentencepiece decodes each run; a special token gets a space before it."""
        out, run, previous_special = "", [], False
        for position, token in enumerate(tokens):
            if token in self.all_special_tokens:
                if not previous_special and position != 0:
                    out += " "
                out += self.sp_model.decode(run) + token
                run, previous_special = [], True
            else:
                run.append(token)
                previous_special = False
        return out + self.sp_model.decode(run)

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        target = Path(save_directory) / (
            (filename_prefix + "-" if filename_prefix else "") + SENTENCEPIECE_FILE
        )
        if Path(self.vocab_file).resolve() != target.resolve():
            shutil.copyfile(self.vocab_file, target)
        return (str(target),)


def _unstripped(token: str | AddedToken | None) -> AddedToken | None:
    """Llama's special tokens eat no whitespace around them (4.30 ``LlamaTokenizer.__init__``)."""
    if isinstance(token, str):
        return AddedToken(token, lstrip=False, rstrip=False, normalized=False, special=True)
    return token


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """Load a tokenizer saved in a local directory (an LLM folder or a run's ``tokenizer/``).

    A folder with a sentencepiece ``tokenizer.model`` is read as the official code reads it
    (``OfficialLlamaTokenizer``); anything else with ``AutoTokenizer``.

    Raises:
        CheckpointError: no such directory, a package needed to read it is missing (named, with the
            pip command), or the files are unreadable.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: tokenizer directory not found")
    has_sentencepiece_model = (path / SENTENCEPIECE_FILE).is_file()
    if has_sentencepiece_model:
        _require_packages(path)
    try:
        if has_sentencepiece_model:
            tokenizer = OfficialLlamaTokenizer.from_pretrained(str(path), local_files_only=True)
        else:
            tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, RuntimeError) as exc:
        if not has_sentencepiece_model and not (path / "tokenizer.json").is_file():
            # transformers then blames a missing sentencepiece or tiktoken; the files are what is missing.
            raise CheckpointError(
                f"{path}: no tokenizer files (tokenizer.model or tokenizer.json) — copy them from the "
                "LLM's release into this folder"
            ) from exc
        raise CheckpointError(f"{path}: cannot load tokenizer ({str(exc).splitlines()[0]})") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = OFFICIAL_PAD
    if tokenizer.bos_token_id is None:
        raise CheckpointError(f"{path}: tokenizer has no BOS token; MiniGPT-4 prompts start with BOS")
    return tokenizer


# pip name → module: what reading a sentencepiece tokenizer.model needs (protobuf: its model proto,
# read to find how stop strings are spelled inside text, and by transformers' own converters).
_SENTENCEPIECE_PACKAGES = {"sentencepiece": "sentencepiece", "protobuf": "google.protobuf"}


def _require_packages(path: Path) -> None:
    missing = [name for name, module in _SENTENCEPIECE_PACKAGES.items() if not _importable(module)]
    if missing:
        raise CheckpointError(
            f"{path}: reading {SENTENCEPIECE_FILE} needs {' and '.join(missing)}, which "
            f"{'is' if len(missing) == 1 else 'are'} not installed: pip install {' '.join(missing)}"
        )


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a missing parent package ("google")
        return False
