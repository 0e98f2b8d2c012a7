"""The configs of ``mgpt4 curate`` and ``curate review`` (light: the CLI builds its options from them)."""

from __future__ import annotations

import dataclasses

from mgpt4.config import GenerateConfig, ModelConfig, field
from mgpt4.conversation import CONTINUE_MIN_TOKENS, CURATE_PROMPT, IMAGE_PLACEHOLDER
from mgpt4.curate.filters import FilterConfig
from mgpt4.curate.fix import FixerConfig
from mgpt4.errors import UsageError


@dataclasses.dataclass
class CurateConfig:
    """Everything ``mgpt4 curate`` needs; saved as ``curate.yaml`` in the output folder."""

    model_source: str | None = field(None, doc="stage-1 run directory, checkpoint folder or preset")
    images: str | None = field(None, doc="folder of images, or a shard set (folder/.tar/brace pattern)")
    out: str | None = field(None, doc="output folder (cc_sbu_align layout + journal + report)")
    num: int = field(5000, doc="describe the first N images in a fixed order (paper: ~5,000)")
    batch_size: int = field(8, doc="images per generate call")
    device: str = field("auto", doc="auto, cpu, cuda, cuda:N")
    prompt: str = field(
        CURATE_PROMPT, doc="first-turn prompt with one <ImageHere> (the paper's; adapt for other templates)"
    )
    continue_min_tokens: int = field(
        CONTINUE_MIN_TOKENS, doc="answers under this many tokens get a Continue turn"
    )
    model: ModelConfig = field(
        default_factory=ModelConfig, doc="model preset/weights when --model is a preset"
    )
    generate: GenerateConfig = field(default_factory=GenerateConfig, doc="decoding settings")
    fixer: FixerConfig = field(default_factory=FixerConfig, doc="the LLM fix step")
    filters: FilterConfig = field(default_factory=FilterConfig, doc="filter thresholds")
    reject: str | None = field(None, doc="file of ids (one per line) a reviewer rejected")

    def validate(self) -> None:
        if self.num < 1:
            raise UsageError(f"num: must be ≥ 1, got {self.num}")
        if self.batch_size < 1:
            raise UsageError(f"batch_size: must be ≥ 1, got {self.batch_size}")
        if self.prompt.count(IMAGE_PLACEHOLDER) != 1:
            raise UsageError(f"prompt: needs exactly one {IMAGE_PLACEHOLDER}, got {self.prompt!r}")
        self.fixer.validate()
        self.filters.validate()


@dataclasses.dataclass
class ReviewConfig:
    """``mgpt4 curate review``: which ids a person rejected in a curated folder."""

    out: str | None = field(None, doc="the curated folder (curate.jsonl, filter_cap.json, image/)")
    reject: str | None = field(None, doc="file of ids to drop, one per line (e.g. from report.html)")
    ids: list[str] = field(default_factory=list, doc="more ids to drop")
