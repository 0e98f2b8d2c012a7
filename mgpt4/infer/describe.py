"""``mgpt4 describe``: find images (files, folders, globs, shard sets), batch them, generate.

Nothing here prints: ``describe_images`` yields one ``DescribeResult`` per input, in input order,
failures included, and the CLI's render layer decides how to show them.

    cfg = DescribeConfig(inputs=["photos/"], batch_size=8)
    for result in describe_images(model, cfg):
        print(result.image, result.text)
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import torch
from PIL import Image

from mgpt4.config import GenerateConfig, ModelConfig, field
from mgpt4.conversation import ALIGNMENT_INSTRUCTIONS, IMAGE_PLACEHOLDER, IMAGE_SLOT, stage2_prompt
from mgpt4.data.images import ImageReadError, open_image
from mgpt4.errors import UsageError
from mgpt4.model.minigpt4 import MiniGPT4
from mgpt4.model.vision import image_transform

log = logging.getLogger("mgpt4.infer")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
SHARD_SUFFIX = ".tar"


@dataclasses.dataclass
class DescribeConfig:
    """``mgpt4 describe``: what to describe, with which model, how to decode and where to write."""

    inputs: list[str] = field(
        default_factory=list, doc="images, folders (recursive), globs, .tar shards or shard brace patterns"
    )
    checkpoint: str | None = field(None, doc="run directory or checkpoint folder; None = build `model`")
    model: ModelConfig = field(default_factory=ModelConfig, doc="preset and official weights (no checkpoint)")
    generate: GenerateConfig = field(default_factory=GenerateConfig, doc="decoding; greedy by default")
    prompt: str | None = field(
        None, doc="instruction (wrapped in the stage-2 template); None = 'Describe this image in detail.'"
    )
    batch_size: int = field(8, doc="images per generate call (left padding, per-row stop)")
    device: str = field("auto", doc="auto (cuda when present), cpu, cuda, cuda:N")
    json: bool = field(False, doc="write JSONL (image, prompt, text, tokens, seconds) to stdout")
    output: str | None = field(None, doc="also write the JSONL to this file (atomically)")
    quiet: bool = field(False, doc="no progress or info on stderr")

    def validate(self) -> None:
        if self.batch_size < 1:
            raise UsageError(f"batch_size: must be >= 1, got {self.batch_size}")
        if self.prompt is not None and self.prompt.count(IMAGE_PLACEHOLDER) > 1:
            raise UsageError(f"prompt: at most one {IMAGE_PLACEHOLDER} (describe shows one image per prompt)")


@dataclasses.dataclass
class DescribeResult:
    """One input's answer, or why it was skipped (``error`` set, ``text`` empty)."""

    image: str
    prompt: str
    text: str = ""
    tokens: int = 0
    seconds: float = 0.0
    error: str | None = None

    def to_json(self) -> dict:
        """The JSONL record: ``image``, ``prompt``, ``text``, ``tokens``, ``seconds``."""
        return {
            "image": self.image,
            "prompt": self.prompt,
            "text": self.text,
            "tokens": self.tokens,
            "seconds": round(self.seconds, 4),
        }


@dataclasses.dataclass
class ImageRequest:
    """One image to answer about, before decoding: its display name, how to open it (or why it
    cannot be), and its own prompt (None = the prompt given to ``generate_batched``)."""

    name: str
    open: Callable[[], Image.Image] | None = None
    error: str | None = None
    prompt: str | None = None


def build_prompt(instruction: str | None, template: str) -> str:
    """The full prompt: ``instruction`` in the model's stage-2 template, unless it is already a prompt.

    ``None`` gives the first official alignment instruction ("Describe this image in detail.");
    text without ``<ImageHere>`` becomes ``<Img><ImageHere></Img> TEXT`` inside the template.
    """
    if instruction is None:
        return stage2_prompt(ALIGNMENT_INSTRUCTIONS[0], template)
    if IMAGE_PLACEHOLDER in instruction:
        return instruction
    return stage2_prompt(f"{IMAGE_SLOT} {instruction.strip()}", template)


# --------------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------------


def collect_inputs(specs: Sequence[str]) -> list[str]:
    """Expand command-line inputs into image paths and shard specs, in order.

    Folders are walked recursively (sorted) for images; a folder holding ``.tar`` files is also a
    shard set (only complete shards, see ``data.shards.find_shards``). Globs are expanded (``**``
    recurses); ``.tar`` files and ``{a..b}`` brace patterns are shard sets. A spec that matches
    nothing is kept so that it is reported as missing.

    Raises:
        UsageError: no inputs were given.
    """
    if not specs:
        raise UsageError("describe: give at least one image, folder, glob or shard set")
    found: list[str] = []
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            images = [
                str(p) for p in sorted(path.rglob("*")) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            ]
            # A folder with shards is also a shard set; one with neither is kept, to be reported.
            found += images + ([spec] if any(path.glob(f"*{SHARD_SUFFIX}")) or not images else [])
        elif _is_brace(spec) and not path.exists():
            found.append(spec)
        elif glob.has_magic(spec) and not path.exists():
            found += [m for m in sorted(glob.glob(spec, recursive=True)) if Path(m).is_file()] or [spec]
        else:
            found.append(spec)
    return found


def count_images(inputs: Sequence[str]) -> int | None:
    """How many results ``describe_images`` will yield, or None when shards make it unknown upfront."""
    return None if any(_is_shard(spec) for spec in inputs) else len(inputs)


def _is_brace(spec: str) -> bool:
    return "{" in spec and ".." in spec


def _is_shard(spec: str) -> bool:
    return spec.endswith(SHARD_SUFFIX) or _is_brace(spec) or Path(spec).is_dir()


def _iter_items(inputs: Iterable[str]) -> Iterator[ImageRequest]:
    for spec in inputs:
        path = Path(spec)
        if path.is_dir() and not any(path.glob(f"*{SHARD_SUFFIX}")):
            yield ImageRequest(spec, error="a folder without image files or .tar shards")
        elif _is_shard(spec):
            yield from _shard_items(spec)
        elif not path.exists():
            yield ImageRequest(spec, error="no such file")
        elif path.suffix.lower() not in IMAGE_SUFFIXES:
            kind = path.suffix or path.name
            yield ImageRequest(
                spec, error=f"unsupported file type '{kind}' (use {', '.join(IMAGE_SUFFIXES)})"
            )
        else:
            yield ImageRequest(spec, open=lambda path=path, name=spec: open_image(path, name))


def _shard_items(spec: str) -> Iterator[ImageRequest]:
    """Every image sample of a shard set, named ``SHARD#KEY``; captions are not needed here.

    A broken shard is one failed item (named by the shard) and the next shard is read as usual;
    decoding errors surface per image when the item is opened.
    """
    from mgpt4.data.shards import find_shards, iter_shard_images

    try:
        shards = find_shards(spec)
    except UsageError as exc:
        yield ImageRequest(spec, error=str(exc))
        return
    for sample in iter_shard_images(shards):
        name = f"{sample.shard}#{sample.key}" if sample.key else sample.shard
        if sample.data is None:
            yield ImageRequest(name, error=sample.error)
        else:
            yield ImageRequest(name, open=lambda data=sample.data, name=name: open_image(data, name))


def _load(item: ImageRequest, transform: Callable) -> torch.Tensor | str:
    """The image tensor, or the one-line reason it cannot be read."""
    if item.error:
        return item.error
    try:
        return transform(item.open())
    except ImageReadError as exc:
        return exc.reason


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# --------------------------------------------------------------------------------------------------
# generation
# --------------------------------------------------------------------------------------------------


def describe_images(
    model: MiniGPT4, cfg: DescribeConfig, inputs: Sequence[str] | None = None
) -> Iterator[DescribeResult]:
    """Describe every input in batches of ``cfg.batch_size``; yields results in input order.

    A batch's answers equal the same images described one at a time under greedy decoding: rows
    are left-padded and each stops at its own ``###`` (``MiniGPT4.generate``).

    Args:
        model: a loaded model (eval mode).
        cfg: prompt, decoding settings, batch size.
        inputs: already collected inputs (``collect_inputs(cfg.inputs)`` when None).
    """
    inputs = collect_inputs(cfg.inputs) if inputs is None else inputs
    prompt = build_prompt(cfg.prompt, model.preset.stage2_template)
    yield from generate_batched(model, _iter_items(inputs), cfg.batch_size, cfg.generate, prompt)


def generate_batched(
    model: MiniGPT4,
    requests: Iterable[ImageRequest],
    batch_size: int,
    config: GenerateConfig,
    prompt: str | None = None,
) -> Iterator[DescribeResult]:
    """The shared batched answering path (describe, eval): one result per request, in order.

    Requests are decoded and transformed as they come; every ``batch_size`` readable images go
    through one ``MiniGPT4.generate`` call. Unreadable ones yield a result with ``error`` set.

    Args:
        model: a loaded model (eval mode).
        requests: images with their own prompt, or None to use ``prompt``.
        batch_size: readable images per generate call.
        config: decoding settings.
        prompt: the prompt of requests that carry none.
    """
    transform = image_transform(model.preset.vision.image_size)
    batch: list[tuple[ImageRequest, torch.Tensor | str]] = []
    for item in requests:
        batch.append((item, _load(item, transform)))
        if sum(torch.is_tensor(loaded) for _, loaded in batch) == batch_size:
            yield from _run_batch(model, batch, prompt, config)
            batch = []
    if batch:
        yield from _run_batch(model, batch, prompt, config)


def _run_batch(
    model: MiniGPT4,
    batch: list[tuple[ImageRequest, torch.Tensor | str]],
    prompt: str | None,
    config: GenerateConfig,
) -> Iterator[DescribeResult]:
    prompts = [item.prompt or prompt or "" for item, _ in batch]
    readable = [(p, loaded) for p, (_, loaded) in zip(prompts, batch, strict=True) if torch.is_tensor(loaded)]
    answers = iter([])
    seconds = 0.0
    if readable:
        start = time.perf_counter()
        generations = model.generate([p for p, _ in readable], torch.stack([t for _, t in readable]), config)
        seconds = (time.perf_counter() - start) / len(readable)
        answers = iter(generations)
    for (item, loaded), item_prompt in zip(batch, prompts, strict=True):
        if isinstance(loaded, str):
            yield DescribeResult(item.name, item_prompt, error=loaded)
        else:
            answer = next(answers)
            yield DescribeResult(
                item.name, item_prompt, text=answer.text, tokens=answer.tokens, seconds=seconds
            )
