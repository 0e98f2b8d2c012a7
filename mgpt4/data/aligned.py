"""The stage-2 aligned set in the released ``cc_sbu_align`` layout (DESIGN.md §5, OFFICIAL.md §7).

    <root>/filter_cap.json   {"annotations": [{"image_id": "2", "caption": "..."}, ...]}
    <root>/image/2.jpg

`AlignedDataset` reads it for finetuning (caption used raw, as upstream); `write_aligned` and
`rewrite_without` produce it for `mgpt4 curate` and manual review. Writes are atomic: every file is
written under a temporary name and renamed, and ``filter_cap.json`` only ever lists images that exist.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch.utils.data
from PIL import Image

from mgpt4.data.images import open_image
from mgpt4.errors import DataError, UsageError

log = logging.getLogger("mgpt4.data")

ANNOTATIONS_FILE = "filter_cap.json"
IMAGE_DIR = "image"


def image_path(root: str | Path, image_id: str) -> Path:
    """Where the image of ``image_id`` lives: ``<root>/image/{image_id}.jpg``."""
    return Path(root) / IMAGE_DIR / f"{image_id}.jpg"


def read_annotations(root: str | Path) -> list[dict[str, Any]]:
    """Read and validate ``<root>/filter_cap.json``.

    Accepts ``{"annotations": [...]}`` or a bare list (upstream's BaseDataset takes both). Each
    annotation keeps its extra fields; ``image_id`` is returned as a string.

    Raises:
        UsageError: the folder or ``filter_cap.json`` is missing.
        DataError: bad JSON, or an annotation without a string ``caption`` or an ``image_id``.
    """
    root = Path(root)
    if not root.is_dir():
        raise UsageError(f"aligned set folder not found: {root}")
    path = root / ANNOTATIONS_FILE
    if not path.is_file():
        raise UsageError(f"{path}: not found; an aligned set needs {ANNOTATIONS_FILE} and {IMAGE_DIR}/")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from exc
    entries = data.get("annotations") if isinstance(data, dict) else data
    if not isinstance(entries, list):
        raise DataError(f'{path}: expected {{"annotations": [...]}} or a list of annotations')
    annotations = []
    for number, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise DataError(f"{path}: annotation {number} is not an object")
        image_id, caption = entry.get("image_id"), entry.get("caption")
        if image_id is None or (isinstance(image_id, str) and not image_id):
            raise DataError(f"{path}: annotation {number} has no image_id")
        if not isinstance(caption, str):
            raise DataError(f"{path}: annotation {number} (image_id {image_id}) has no caption string")
        annotations.append({**entry, "image_id": str(image_id)})
    return annotations


class AlignedDataset(torch.utils.data.Dataset):
    """Map-style stage-2 data set: ``{"image": transform(pil), "text": caption, "image_id": str}``.

    Everything is checked when it is built, so a missing image fails before training starts.

    Args:
        root: folder holding ``filter_cap.json`` and ``image/``.
        transform: PIL RGB image → model input; None keeps the PIL image.
    """

    def __init__(self, root: str | Path, transform: Callable[[Image.Image], Any] | None = None) -> None:
        self.root = Path(root)
        self.transform = transform
        self.annotations = read_annotations(self.root)
        if not self.annotations:
            raise DataError(f"{self.root / ANNOTATIONS_FILE}: no annotations")
        missing = [p for a in self.annotations if not (p := image_path(self.root, a["image_id"])).is_file()]
        if missing:
            raise DataError(
                f"{self.root}: {len(missing)} of {len(self.annotations)} images missing, first: {missing[0]}"
            )

    def __len__(self) -> int:
        return len(self.annotations)

    def __getitem__(self, index: int) -> dict[str, Any]:
        annotation = self.annotations[index]
        path = image_path(self.root, annotation["image_id"])
        image = open_image(path)  # DataError (per item: training skips and counts it) when unreadable
        return {
            "image": self.transform(image) if self.transform else image,
            "text": annotation["caption"],  # raw: upstream applies no text processor in stage 2
            "image_id": annotation["image_id"],
        }


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


def _check_id(image_id: str) -> None:
    if not image_id or image_id != os.path.basename(image_id) or image_id.startswith("."):
        raise UsageError(f"image_id {image_id!r} cannot be a file name: use letters, digits, - and _")


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Run ``write(temp_path)`` on a temporary file beside ``path``, then rename it over ``path``."""
    # Not mkstemp: its 0600 mode would survive the rename; a unique name keeps the umask's mode.
    temp = str(path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(temp)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def _write_image(source: Image.Image | str | Path, target: Path) -> None:
    if isinstance(source, Image.Image):
        _atomic_write(target, lambda temp: source.convert("RGB").save(temp, format="JPEG", quality=95))
        return
    source = Path(source)
    if not source.is_file():
        raise UsageError(f"image not found: {source}")
    if target.exists() and source.resolve() == target.resolve():
        return  # rewriting a set in place
    if source.suffix.lower() in (".jpg", ".jpeg"):
        _atomic_write(target, lambda temp: shutil.copyfile(source, temp))  # keep the bytes: no re-encode
        return
    image = open_image(source)
    _atomic_write(target, lambda temp: image.save(temp, format="JPEG", quality=95))


def _write_annotations(root: Path, annotations: list[dict[str, Any]]) -> None:
    text = json.dumps({"annotations": annotations}, ensure_ascii=False, indent=1)
    _atomic_write(root / ANNOTATIONS_FILE, lambda temp: Path(temp).write_text(text + "\n", encoding="utf-8"))


def write_aligned(root: str | Path, items: Iterable[tuple[str, Image.Image | str | Path, str]]) -> Path:
    """Write an aligned set: ``image/{image_id}.jpg`` for each item, then ``filter_cap.json`` listing them.

    An existing ``filter_cap.json`` is replaced by one listing exactly ``items``; other files in the
    folder are left alone.

    Args:
        root: output folder, created if missing.
        items: ``(image_id, PIL image or image file path, caption)``. JPEG files are copied as they
            are; other images are encoded as JPEG (quality 95).

    Returns:
        The path of ``filter_cap.json``.

    Raises:
        UsageError: a duplicate or unusable image_id, or a missing source image.
    """
    root = Path(root)
    (root / IMAGE_DIR).mkdir(parents=True, exist_ok=True)
    annotations: list[dict[str, Any]] = []
    seen: set[str] = set()
    for image_id, source, caption in items:
        image_id = str(image_id)
        _check_id(image_id)
        if image_id in seen:
            raise UsageError(f"duplicate image_id {image_id!r} in the aligned set for {root}")
        seen.add(image_id)
        _write_image(source, image_path(root, image_id))
        annotations.append({"image_id": image_id, "caption": caption})
    _write_annotations(root, annotations)  # last: it only lists images already in place
    log.info("wrote %d aligned samples to %s", len(annotations), root)
    return root / ANNOTATIONS_FILE


def rewrite_without(root: str | Path, rejected_ids: Iterable[str]) -> int:
    """Drop annotations and images of ``rejected_ids`` (manual review); returns how many were dropped.

    ``filter_cap.json`` is rewritten first, so the set never lists a deleted image. Ids not in the
    set are logged and ignored.
    """
    root = Path(root)
    rejected = {str(i) for i in rejected_ids}
    annotations = read_annotations(root)
    kept = [a for a in annotations if a["image_id"] not in rejected]
    present = {a["image_id"] for a in annotations}
    unknown = sorted(rejected - present)
    if unknown:
        log.warning("%s: %d rejected ids are not in the set: %s", root, len(unknown), ", ".join(unknown[:10]))
    _write_annotations(root, kept)
    for image_id in sorted(rejected & present):
        image_path(root, image_id).unlink(missing_ok=True)
    return len(annotations) - len(kept)
