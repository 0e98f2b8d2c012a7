"""``mgpt4 chat``: a conversation about one or more images, with history, commands and transcripts.

``ChatSession`` is pure (no terminal): it keeps the turns, builds the official chat prompt
(``conversation.chat_prompt``), trims the oldest turns to fit the context, and runs the commands.
The terminal loop (``mgpt4.cli.chat``) only reads lines and shows what this returns; ``start_chat``
sets a session up from a ``ChatConfig`` (model, transcript, first image).

    session = ChatSession(model, ChatConfig().generate)
    session.show_image("cat.jpg")
    reply = session.handle("what is the cat doing?")   # Reply(kind="answer", text=...)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mgpt4.config import GenerateConfig, from_dict, parse_yaml, to_dict
from mgpt4.conversation import ChatTurn, chat_prompt, clean_answer, split_at_images
from mgpt4.data.images import IMAGE_SUFFIXES, open_image
from mgpt4.errors import ConfigError, DataError, UsageError
from mgpt4.infer.config import ChatConfig, ChatGenerateConfig
from mgpt4.model.minigpt4 import MiniGPT4
from mgpt4.model.vision import image_transform
from mgpt4.output_paths import check_writable

log = logging.getLogger("mgpt4.infer")

TRANSCRIPT_VERSION = 1
# /set accepts the decoding keys a user tunes mid-conversation (DESIGN.md §7), plus a few more.
SETTABLE = (
    "temperature",
    "top_p",
    "num_beams",
    "max_new_tokens",
    "repetition_penalty",
    "do_sample",
    "seed",
    "max_length",
)

HELP = """\
/image PATH     show a new image; it goes with your next question
/reset          forget the conversation (and the image)
/save FILE      write the transcript as JSON (reload it with --load FILE)
/set KEY VALUE  change decoding: temperature, top_p, num_beams, max_new_tokens, repetition_penalty,
                do_sample, seed, max_length (`/set` alone shows the current values)
/help           this list
/exit           leave (Ctrl-D works too); Ctrl-C stops the current answer"""


@dataclasses.dataclass
class ChatStart:
    """A session ready for its first line, and what went wrong setting it up (never fatal)."""

    session: ChatSession
    warnings: list[str]  # images of a loaded transcript that could not be re-read
    image_error: str | None  # the first image could not be shown; the session goes on without it


def start_chat(cfg: ChatConfig, model: MiniGPT4 | None = None) -> ChatStart:
    """Load the model (unless given), resume ``cfg.load`` and show ``cfg.image``.

    Raises:
        UsageError: a bad model source, device or transcript path; DataError: not a transcript.
    """
    if model is None:
        from mgpt4.infer.loading import load_model

        model = load_model(cfg.model, cfg.checkpoint, cfg.device)
    session = ChatSession(model, cfg.generate)
    warnings = session.load(cfg.load) if cfg.load else []
    image_error = None
    if cfg.image:
        first = session.handle(f"/image {cfg.image}")
        image_error = first.text if first.kind == "error" else None
    return ChatStart(session, warnings, image_error)


@dataclasses.dataclass
class Reply:
    """What one input line produced: ``answer``, a command ``message``, ``notice``, ``error`` or ``exit``."""

    kind: str
    text: str = ""
    tokens: int = 0
    seconds: float = 0.0
    note: str | None = None  # e.g. "history trimmed", "stopped"


class ChatSession:
    """History, images, settings and commands of one conversation; no terminal I/O."""

    def __init__(self, model: MiniGPT4, config: GenerateConfig | None = None) -> None:
        self.model = model
        self.config = config or ChatGenerateConfig()
        self.turns: list[ChatTurn] = []
        self.pending_image: str | None = None  # shown with the next question
        self._images: dict[str, torch.Tensor] = {}  # path → (3, H, W), for every image in history
        self._transform = image_transform(model.preset.vision.image_size)

    # ----------------------------------------------------------------------------------------------
    # input dispatch
    # ----------------------------------------------------------------------------------------------

    def handle(self, line: str, on_text: Callable[[str], None] | None = None) -> Reply:
        """Run one input line: a ``/command`` or a question. Errors come back as ``Reply("error")``.

        Args:
            line: the user's line.
            on_text: called with the answer-so-far while tokens stream in.
        """
        line = line.strip()
        if not line:
            return Reply("notice", "empty input: type a question, or /help")
        try:
            if line.startswith("/"):
                return self._command(line)
            return self.ask(line, on_text)
        except (UsageError, DataError) as exc:
            return Reply("error", str(exc))

    def _command(self, line: str) -> Reply:
        name, _, rest = line.partition(" ")
        rest = rest.strip()
        if name in ("/exit", "/quit"):
            return Reply("exit")
        if name == "/help":
            return Reply("message", HELP)
        if name == "/reset":
            self.reset()
            return Reply("message", "conversation cleared")
        if name == "/image":
            if not rest:
                raise UsageError("/image needs a path: /image PATH")
            self.show_image(rest)
            return Reply("message", f"image {rest} will go with your next question")
        if name == "/save":
            if not rest:
                raise UsageError("/save needs a file name: /save FILE")
            return Reply("message", f"saved {len(self.turns)} turn(s) to {self.save(rest)}")
        if name == "/set":
            if not rest:
                return Reply("message", self.settings_text())
            key, _, value = rest.partition(" ")
            self.set_option(key, value.strip())
            return Reply("message", f"{key} = {getattr(self.config, key)}")
        raise UsageError(f"unknown command {name}; /help lists the commands")

    # ----------------------------------------------------------------------------------------------
    # state
    # ----------------------------------------------------------------------------------------------

    def show_image(self, path: str) -> None:
        """Read ``path`` now (so a bad file is reported at once); it goes with the next question.

        Raises:
            UsageError: missing file or unsupported type; DataError: unreadable image.
        """
        self._images[path] = self._read_image(path)
        self.pending_image = path

    def _read_image(self, path: str) -> torch.Tensor:
        file = Path(path).expanduser()
        if file.is_dir():
            raise UsageError(f"{path}: is a folder, not an image file")
        if not file.is_file():
            raise UsageError(f"{path}: no such image file")
        if file.suffix.lower() not in IMAGE_SUFFIXES:
            raise UsageError(f"{path}: unsupported file type (use {', '.join(IMAGE_SUFFIXES)})")
        return self._transform(open_image(file, path))

    def reset(self) -> None:
        """Forget every turn and image."""
        self.turns.clear()
        self._images.clear()
        self.pending_image = None

    def set_option(self, key: str, value: str) -> None:
        """``/set KEY VALUE``: change one decoding setting, validated like a config override.

        Raises:
            ConfigError: unknown key (with the nearest one) or a value of the wrong type.
        """
        if key not in SETTABLE:
            raise ConfigError(f"/set: unknown key '{key}'; choose one of {', '.join(SETTABLE)}")
        data = to_dict(self.config) | {key: parse_yaml(value, source=f"/set {key}") if value else value}
        self.config = from_dict(type(self.config), data, "")  # runs GenerateConfig.validate

    def settings_text(self) -> str:
        return "  ".join(f"{key}={getattr(self.config, key)}" for key in SETTABLE)

    # ----------------------------------------------------------------------------------------------
    # answering
    # ----------------------------------------------------------------------------------------------

    def ask(self, question: str, on_text: Callable[[str], None] | None = None) -> Reply:
        """Answer ``question`` with the (trimmed) history as context; Ctrl-C keeps the partial answer.

        Raises:
            UsageError: the question holds bytes that are not text (e.g. Latin-1 piped into a UTF-8
                reader arrives as lone surrogates, which no tokenizer accepts).
        """
        _check_text(question)
        turn = ChatTurn(question, image=self.pending_image)
        turns, dropped = self.fit_context(self.turns + [turn])
        images = [self._images[t.image] for t in turns if t.image is not None]
        image_tensor = torch.stack(images) if images else self._no_images()
        streamer = (
            _TextStreamer(self.model.tokenizer, on_text) if on_text and self.config.num_beams == 1 else None
        )
        start = time.perf_counter()
        note = f"history trimmed: the {dropped} oldest turn(s) no longer fit max_length" if dropped else None
        try:
            generation = self.model.generate(
                [chat_prompt(turns, self.model.preset.chat_style)],
                [image_tensor],
                self.config,
                streamer=streamer,
            )[0]
            text, tokens = generation.text, generation.tokens
        except KeyboardInterrupt:
            if streamer is None:
                raise
            text, tokens, note = clean_answer(streamer.text), len(streamer.ids), "stopped"
        turn.answer = text
        self.turns.append(turn)
        self.pending_image = None
        return Reply("answer", text, tokens=tokens, seconds=time.perf_counter() - start, note=note)

    def _no_images(self) -> torch.Tensor:
        size = self.model.preset.vision.image_size
        return torch.zeros(0, 3, size, size)

    def fit_context(self, turns: list[ChatTurn]) -> tuple[list[ChatTurn], int]:
        """Drop whole oldest turns until prompt + ``max_new_tokens`` fits ``max_length``.

        The newest image stays in view: when the turn that showed it is dropped, it moves to the
        first kept turn. The last turn is always kept (``generate`` then cuts from the left, as MG does).
        """
        dropped = 0
        while (
            len(turns) > 1 and self.prompt_length(turns) + self.config.max_new_tokens > self.config.max_length
        ):
            first, turns = turns[0], turns[1:]
            dropped += 1
            if first.image is not None and not any(t.image for t in turns):
                turns = [dataclasses.replace(turns[0], image=first.image)] + turns[1:]
        return turns, dropped

    def prompt_length(self, turns: list[ChatTurn]) -> int:
        """Embedded length of the chat prompt: BOS + text tokens + image tokens."""
        prompt = chat_prompt(turns, self.model.preset.chat_style)
        segments = split_at_images(prompt)
        text = sum(len(self.model.tokenizer(s, add_special_tokens=False).input_ids) for s in segments if s)
        return 1 + text + (len(segments) - 1) * self.model.preset.num_image_tokens

    # ----------------------------------------------------------------------------------------------
    # transcripts
    # ----------------------------------------------------------------------------------------------

    def save(self, path: str) -> Path:
        """Write the transcript (turns, image paths, settings) as JSON, atomically.

        Raises:
            UsageError: ``path`` cannot be written (a folder, under a file, read-only);
            DataError: the write itself failed (e.g. the disk is full).
        """
        file = check_writable(path, "/save")
        data = {
            "version": TRANSCRIPT_VERSION,
            "generate": to_dict(self.config),
            "turns": [dataclasses.asdict(t) for t in self.turns],
            "pending_image": self.pending_image,
        }
        tmp = file.with_name(file.name + ".tmp")
        try:
            tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
            tmp.replace(file)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise DataError(f"/save {path}: {exc.strerror or exc}") from exc
        return file

    def load(self, path: str) -> list[str]:
        """Resume a transcript from ``save``; returns one warning per image that could not be re-read.

        The turns and images come back; decoding settings stay those of the current command line
        (the saved ``generate`` section records what the transcript was made with).

        Raises:
            UsageError: missing file; DataError: not a transcript.
        """
        data = _read_transcript(path)
        self.reset()
        warnings = []
        for raw in data["turns"]:
            turn = ChatTurn(raw["question"], raw.get("answer"), raw.get("image"))
            if turn.image is not None and turn.image not in self._images:
                try:
                    self._images[turn.image] = self._read_image(turn.image)
                except (UsageError, DataError) as exc:
                    warnings.append(f"{exc}; that turn continues without its image")
                    turn.image = None
            self.turns.append(turn)
        pending = data.get("pending_image")
        if pending:
            try:
                self.show_image(pending)
            except (UsageError, DataError) as exc:
                warnings.append(str(exc))
        return warnings


def _check_text(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        char = text[exc.start]
        byte = f"byte {ord(char) - 0xDC00:#04x}" if 0xDC80 <= ord(char) <= 0xDCFF else f"{char!r}"
        raise UsageError(
            f"the question is not UTF-8 text ({byte} at character {exc.start + 1}); send UTF-8 instead"
        ) from exc


def _read_transcript(path: str) -> dict[str, Any]:
    file = Path(path).expanduser()
    if not file.is_file():
        raise UsageError(f"{path}: no such transcript file")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not a chat transcript ({exc})") from exc
    turns = data.get("turns") if isinstance(data, dict) else None
    if not isinstance(turns, list) or not all(_is_turn(t) for t in turns):
        raise DataError(
            f"{path}: not a chat transcript (expected {{'turns': [{{'question', 'answer', 'image'}}]}}, "
            "each a string; answer and image may be null)"
        )
    if not isinstance(data.get("pending_image"), str | None):
        raise DataError(f"{path}: not a chat transcript ('pending_image' must be a path or null)")
    return data


def _is_turn(turn: Any) -> bool:
    return (
        isinstance(turn, dict)
        and isinstance(turn.get("question"), str)
        and all(isinstance(turn.get(key), str | None) for key in ("answer", "image"))
    )


class _TextStreamer:
    """A transformers streamer (``put``/``end``) that decodes the growing answer and reports its text.

    The first ``put`` is the prompt (empty with ``inputs_embeds``) and is skipped, as
    ``TextStreamer(skip_prompt=True)`` does.
    """

    def __init__(self, tokenizer, on_text: Callable[[str], None]) -> None:
        self.tokenizer = tokenizer
        self.on_text = on_text
        self.ids: list[int] = []
        self.text = ""
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.ids.extend(int(v) for v in value.reshape(-1).tolist())
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        # A multi-byte character split across tokens decodes as U+FFFD until its last byte arrives;
        # wait for it, so that every reported text extends the previous one.
        if not self.text.endswith("\ufffd"):
            self.on_text(self.text)

    def end(self) -> None:
        """Nothing is held back: every ``put`` already reported the full text."""
