"""``mgpt4 describe``: describe images (files, folders, globs, shard sets) in batches.

Nothing here prints: ``run_describe`` loads the model, reports each ``DescribeResult`` through its
``progress`` callback as soon as it is ready (failures included, in input order), writes ``output``
as JSONL, and returns a ``DescribeSummary``. The CLI decides how results look on a terminal.

    summary = run_describe(DescribeConfig(inputs=["photos/"], checkpoint="runs/stage2"))
    for result in summary.results:
        print(result.image, result.text)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import torch
from PIL import Image

from mgpt4.config import GenerateConfig
from mgpt4.conversation import ALIGNMENT_INSTRUCTIONS, IMAGE_PLACEHOLDER, IMAGE_SLOT, stage2_prompt
from mgpt4.data.images import ImageReadError, count_sources, expand_inputs, iter_sources
from mgpt4.errors import UsageError
from mgpt4.infer.config import DescribeConfig
from mgpt4.model.minigpt4 import MiniGPT4
from mgpt4.model.vision import image_transform
from mgpt4.output_paths import check_writable

log = logging.getLogger("mgpt4.infer")


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
    """Expand command-line inputs into image paths and shard specs, in order (``data.images.expand_inputs``).

    Raises:
        UsageError: no inputs were given.
    """
    if not specs:
        raise UsageError("describe: give at least one image, folder, glob or shard set")
    return expand_inputs(specs)


def count_images(inputs: Sequence[str]) -> int | None:
    """How many results ``describe_images`` will yield, or None when shards make it unknown upfront."""
    return count_sources(inputs)


def _iter_items(inputs: Iterable[str]) -> Iterator[ImageRequest]:
    for source in iter_sources(list(inputs)):
        if source.error is not None:
            yield ImageRequest(source.name, error=source.error)
        else:
            yield ImageRequest(source.name, open=source.open)


def _load(item: ImageRequest, transform: Callable) -> torch.Tensor | str:
    """The image tensor, or the one-line reason it cannot be read."""
    if item.error:
        return item.error
    try:
        return transform(item.open())
    except ImageReadError as exc:
        return exc.reason


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


# --------------------------------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------------------------------

DescribeProgress = Callable[[DescribeResult, int, "int | None"], None]


@dataclasses.dataclass
class DescribeSummary:
    """What ``run_describe`` did: every result in input order, and the counts."""

    results: list[DescribeResult]
    total: int | None  # inputs known upfront (None with shard sets)
    output: str | None

    @property
    def described(self) -> int:
        return sum(r.error is None for r in self.results)

    @property
    def failed(self) -> int:
        return sum(r.error is not None for r in self.results)

    def to_json(self) -> dict[str, Any]:
        return {"described": self.described, "failed": self.failed, "output": self.output}


def run_describe(
    cfg: DescribeConfig, progress: DescribeProgress | None = None, model: MiniGPT4 | None = None
) -> DescribeSummary:
    """Describe ``cfg.inputs``; each result goes to ``progress`` as soon as it is ready.

    Args:
        cfg: inputs, model, decoding, batch size, ``output`` (JSONL written to a temporary name and
            renamed when the run completes).
        progress: called with (result, results so far, total or None) for every input, in order.
        model: an already loaded model (e.g. the demo's); None loads ``cfg.checkpoint``/``cfg.model``.

    Returns:
        Every result (failures have ``error`` set); a run with failures still writes ``output``.

    Raises:
        UsageError: no inputs, an unwritable ``output``, a bad model source or device.
    """
    inputs = collect_inputs(cfg.inputs)
    output = check_writable(cfg.output, "--output") if cfg.output else None  # before the model loads
    if model is None:
        from mgpt4.infer.loading import load_model

        model = load_model(cfg.model, cfg.checkpoint, cfg.device)
    total = count_images(inputs)
    results: list[DescribeResult] = []
    with _JsonlFile(output) as sink:
        for result in describe_images(model, cfg, inputs):
            results.append(result)
            if result.error is None:
                sink.write(result.to_json())
            if progress is not None:
                progress(result, len(results), total)
            elif len(results) % cfg.batch_size == 0 or len(results) == total:
                log.info("described %d/%s", len(results), total or "?")
    summary = DescribeSummary(results, total, str(output) if output else None)
    if output is not None:
        log.info("wrote %d record(s) to %s", summary.described, output)
    return summary


class _JsonlFile:
    """JSONL lines into ``path`` (when given) under a temporary name, renamed only on success."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._file: IO[str] | None = None

    def __enter__(self) -> _JsonlFile:
        if self.path is not None:
            self._file = self._tmp().open("w", encoding="utf-8")
        return self

    def write(self, record: dict[str, Any]) -> None:
        if self._file is not None:
            self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
            self._file.flush()

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._file is None:
            return
        self._file.close()
        if exc_type is None:
            self._tmp().replace(self.path)
        else:
            self._tmp().unlink(missing_ok=True)

    def _tmp(self) -> Path:
        assert self.path is not None
        return self.path.with_name(self.path.name + ".tmp")
