"""``EvalConfig``: what to evaluate, on which data, with which model, and where the results go."""

from __future__ import annotations

import dataclasses
from typing import Literal

from mgpt4.config import GenerateConfig, ModelConfig, field
from mgpt4.conversation import IMAGE_PLACEHOLDER
from mgpt4.errors import UsageError

TaskName = Literal["captions", "pope", "vqa", "judge", "shapes"]
TASK_NAMES: tuple[str, ...] = ("captions", "pope", "vqa", "judge", "shapes")


@dataclasses.dataclass
class JudgeConfig:
    """The OpenAI-compatible endpoint that rates answers for the ``judge`` task."""

    url: str | None = field(None, doc="base URL (…/v1); default env OPENAI_BASE_URL, else api.openai.com")
    model: str = field("gpt-4o-mini", doc="judge model name sent to the endpoint")
    key: str | None = field(None, doc="API key; default env OPENAI_API_KEY (never saved to disk)")
    timeout: float = field(60.0, doc="seconds per HTTP request")
    retries: int = field(4, doc="retries after a 429/5xx/connection error")
    backoff: float = field(1.0, doc="first retry delay in seconds, doubled each retry")
    workers: int = field(4, doc="concurrent requests")
    max_new_tokens: int = field(200, doc="longest judge reply, in tokens")

    def validate(self) -> None:
        if self.retries < 0 or self.workers < 1 or self.timeout <= 0:
            raise UsageError("judge: retries must be ≥ 0, workers ≥ 1 and timeout > 0")


@dataclasses.dataclass
class EvalConfig:
    """``mgpt4 eval``: a task, its data, the model, decoding, batch size and the output folder."""

    task: TaskName = field("shapes", doc="captions, pope, vqa, judge or shapes")
    data: str | None = field(
        None,
        doc="captions: COCO captions JSON, cc_sbu_align folder or shard set; pope/vqa/judge: JSON lines "
        "(judge also a cc_sbu_align folder); shapes: a folder from the demo (None = 200 built-in images)",
    )
    images: str | None = field(
        None, doc="folder the image paths in `data` are relative to (default: the data file's folder)"
    )
    out: str | None = field(
        None, doc="output folder for answers.jsonl, scores.json, report.html (default evals/TASK)"
    )
    checkpoint: str | None = field(None, doc="run directory or checkpoint folder; None = build `model`")
    model: ModelConfig = field(default_factory=ModelConfig, doc="preset and official weights (no checkpoint)")
    generate: GenerateConfig = field(default_factory=GenerateConfig, doc="decoding; greedy by default")
    prompt: str | None = field(
        None, doc="instruction, {question} = the item's question; None = the task's default"
    )
    prompt_style: Literal["describe", "chat"] = field(
        "describe", doc="describe: the stage-2 template, as `describe`; chat: a fresh official chat prompt"
    )
    batch_size: int = field(8, doc="images per generate call (left padding, per-row stop)")
    device: str = field("auto", doc="auto (cuda when present), cpu, cuda, cuda:N")
    limit: int | None = field(None, doc="answer only the first N items (a quick look)")
    meteor: bool = field(True, doc="captions: also METEOR (needs `java`; said so when it is missing)")
    judge: JudgeConfig = field(default_factory=JudgeConfig, doc="judge task: the rating endpoint")

    def validate(self) -> None:
        if self.batch_size < 1:
            raise UsageError(f"batch_size: must be ≥ 1, got {self.batch_size}")
        if self.limit is not None and self.limit < 1:
            raise UsageError(f"limit: must be ≥ 1, got {self.limit}")
        if self.prompt is not None and self.prompt.count(IMAGE_PLACEHOLDER) > 1:
            raise UsageError(f"prompt: at most one {IMAGE_PLACEHOLDER} (one image per question)")
        if self.prompt is not None and IMAGE_PLACEHOLDER in self.prompt and self.prompt_style == "chat":
            raise UsageError(f"prompt: the chat style places the image itself; drop {IMAGE_PLACEHOLDER}")
        self.judge.validate()

    def output_dir(self) -> str:
        """``out``, or ``evals/TASK`` when it is not set."""
        return self.out or f"evals/{self.task}"
