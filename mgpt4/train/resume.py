"""Which checkpoint a rerun continues from: the newest *intact* one, never a silent start from scratch.

``checkpoints/latest`` is only a hint. The resume point is the newest ``step-N`` folder whose
manifest checks out (``mgpt4.train.manifest``); newer folders that do not are named in a warning and
moved aside to ``step-N.skipped`` (kept, never overwritten). Unfinished saves (``step-N.partial``,
left by a kill mid-save) are removed. A run directory that has checkpoints but no usable one is
refused: training from step 1 would overwrite them and duplicate ``metrics.jsonl``.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import shutil
from pathlib import Path

from mgpt4.errors import CheckpointError
from mgpt4.train import manifest

log = logging.getLogger("mgpt4.train")

STEP_PATTERN = re.compile(r"step-(\d+)")
PARTIAL_SUFFIX = ".partial"
SKIPPED_SUFFIX = ".skipped"


def checkpoints_dir(run: Path) -> Path:
    return run / "checkpoints"


def step_folders(run: Path) -> list[Path]:
    """``checkpoints/step-N`` folders, newest first."""
    folders = [
        p for p in checkpoints_dir(run).glob("step-*") if STEP_PATTERN.fullmatch(p.name) and p.is_dir()
    ]
    return sorted(folders, key=lambda p: int(p.name.split("-")[1]), reverse=True)


@dataclasses.dataclass
class ResumePlan:
    """Where a run continues: ``folder`` (None = from step 0) and what had to be passed over."""

    folder: Path | None = None
    step: int = 0
    world_size: int = 1
    skipped: list[tuple[Path, str]] = dataclasses.field(default_factory=list)  # (newer folder, why)
    partial: list[Path] = dataclasses.field(default_factory=list)  # unfinished saves
    latest_hint: str | None = None  # what checkpoints/latest says, if it exists


def plan_resume(run: Path) -> ResumePlan:
    """Find the newest intact checkpoint of ``run`` (reads and hashes; changes nothing).

    Raises:
        CheckpointError: the run has checkpoints but none is intact, or the intact one holds
            pickled objects that loading could run as code.
    """
    folder = checkpoints_dir(run)
    plan = ResumePlan()
    if not folder.is_dir():
        return plan
    marker = folder / "latest"
    if marker.is_file():
        plan.latest_hint = marker.read_text(errors="replace").strip()
    plan.partial = sorted(p for p in folder.glob(f"step-*{PARTIAL_SUFFIX}") if p.is_dir())
    for candidate in step_folders(run):
        try:
            found = manifest.verify(candidate)
        except CheckpointError as exc:
            plan.skipped.append((candidate, str(exc)))
            continue
        manifest.check_pickles(candidate)  # a tampered folder is refused, not skipped
        plan.folder, plan.step, plan.world_size = candidate, found["step"], found["world_size"]
        return plan
    if plan.skipped or plan.latest_hint is not None:
        reasons = "; ".join(f"{p.name}: {why}" for p, why in plan.skipped[:2]) or (
            f"latest names {plan.latest_hint or 'nothing'!r} and no step-N folder exists"
        )
        raise CheckpointError(
            f"{folder}: no intact checkpoint to resume from ({reasons}); to start over, move {folder} away "
            "or choose a new out="
        )
    return plan


def apply_plan(plan: ResumePlan) -> None:
    """Warn about and move aside the folders passed over; remove unfinished saves."""
    for partial in plan.partial:
        log.info("removing %s: a save that never finished", partial)
        shutil.rmtree(partial, ignore_errors=True)
    for folder, why in plan.skipped:
        moved = move_aside(folder)
        log.warning("skipped %s (%s); kept it as %s", folder, why, moved.name)
    if plan.folder is not None and plan.latest_hint not in (None, plan.folder.name):
        log.warning("checkpoints/latest names %r; resuming from %s, the newest intact checkpoint",
                    plan.latest_hint, plan.folder.name)  # fmt: skip


def move_aside(folder: Path) -> Path:
    """Rename ``step-N`` to ``step-N.skipped`` (or ``.skipped-2`` …) so that nothing overwrites it."""
    target = folder.with_name(folder.name + SKIPPED_SUFFIX)
    number = 2
    while target.exists():
        target = folder.with_name(f"{folder.name}{SKIPPED_SUFFIX}-{number}")
        number += 1
    folder.rename(target)
    return target
