"""``captions``: describe each image, score against its reference captions (BLEU, CIDEr-D, ROUGE-L).

Data, by what ``data`` is:

- a COCO-style captions JSON: ``{"images": [{"id", "file_name"}], "annotations": [{"image_id",
  "caption"}]}`` (``captions_val2014.json``), or a list ``[{"image": path, "caption": str | [str]}]``
  (the Karpathy-split files LAVIS uses); image paths are relative to ``images`` or the file's folder;
- a ``cc_sbu_align`` folder (``filter_cap.json`` + ``image/``): one reference per image;
- a shard set (``.tar``, brace pattern or a folder of tars): the ``.txt`` member is the reference
  (else the ``.json``'s ``caption``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mgpt4.data import aligned
from mgpt4.data.images import open_image
from mgpt4.data.shards import IMAGE_EXTENSIONS, find_shards
from mgpt4.errors import DataError, UsageError
from mgpt4.eval.config import EvalConfig
from mgpt4.eval.metrics.captions import score_captions
from mgpt4.eval.tasks.base import (
    EvalItem,
    Task,
    TaskData,
    TaskScores,
    check_unique,
    fingerprint,
    image_item,
    images_root,
    read_json,
    require_file,
)

DATA_HELP = "a COCO captions JSON, a cc_sbu_align folder or a shard set"


def load(cfg: EvalConfig) -> TaskData:
    spec = cfg.data
    if spec and (spec.endswith(".tar") or "{" in spec or _is_shard_folder(Path(spec))):
        return _load_shards(spec)
    path = require_file(spec, "captions", DATA_HELP)
    if path.is_dir():
        return _load_aligned(path)
    return _load_json(path, images_root(cfg, path))


def _is_shard_folder(path: Path) -> bool:
    return path.is_dir() and not (path / aligned.ANNOTATIONS_FILE).is_file() and any(path.glob("*.tar"))


def _load_aligned(root: Path) -> TaskData:
    try:
        annotations = aligned.read_annotations(root)
    except DataError as exc:  # a malformed data file is bad input: exit 2
        raise UsageError(str(exc)) from exc
    refs: dict[str, list[str]] = {}
    for entry in annotations:
        refs.setdefault(entry["image_id"], []).append(entry["caption"])
    items = [
        image_item(image_id, root / aligned.IMAGE_DIR, f"{image_id}.jpg", reference=captions)
        for image_id, captions in refs.items()
    ]
    files = [root / aligned.ANNOTATIONS_FILE]
    return TaskData(iter(items), len(items), fingerprint(root, files, [i.image for i in items], len(items)))


def _load_json(path: Path, root: Path) -> TaskData:
    data = read_json(path)
    if isinstance(data, dict) and "annotations" in data:
        pairs = _coco_pairs(data, path)
    elif isinstance(data, list):
        pairs = _list_pairs(data, path)
    else:
        raise UsageError(f'{path}: expected COCO captions ({{"images", "annotations"}}) or a list of images')
    items = [
        image_item(item_id, root, name, reference=captions) for item_id, (name, captions) in pairs.items()
    ]
    return TaskData(iter(items), len(items), fingerprint(path, [path], [i.image for i in items], len(items)))


def _coco_pairs(data: dict[str, Any], path: Path) -> dict[str, tuple[str, list[str]]]:
    names: dict[str, str] = {}
    for number, image in enumerate(data.get("images") or []):
        if not isinstance(image, dict) or "id" not in image or not isinstance(image.get("file_name"), str):
            raise UsageError(f"{path}: images[{number}] needs an 'id' and a 'file_name'")
        if str(image["id"]) in names:
            raise UsageError(
                f"{path}: images[{number}]: id {image['id']!r} appears twice; ids must be unique"
            )
        names[str(image["id"])] = image["file_name"]
    pairs: dict[str, tuple[str, list[str]]] = {}
    annotations = data["annotations"]
    if not isinstance(annotations, list):
        raise UsageError(f"{path}: 'annotations' must be a list")
    for number, entry in enumerate(annotations):
        where = f"{path}: annotations[{number}]"
        if (
            not isinstance(entry, dict)
            or "image_id" not in entry
            or not isinstance(entry.get("caption"), str)
        ):
            raise UsageError(f"{where} needs an 'image_id' and a 'caption' string")
        image_id = str(entry["image_id"])
        if image_id not in names:
            raise UsageError(f"{where}: image_id {image_id} is not in 'images'")
        pairs.setdefault(image_id, (names[image_id], []))[1].append(entry["caption"])
    return pairs


def _list_pairs(data: list[Any], path: Path) -> dict[str, tuple[str, list[str]]]:
    pairs: dict[str, tuple[str, list[str]]] = {}
    for number, entry in enumerate(data):
        where = f"{path}: entry {number}"
        if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
            raise UsageError(f"{where} needs an 'image' path")
        captions = entry.get("caption")
        captions = [captions] if isinstance(captions, str) else captions
        if not isinstance(captions, list) or not captions or not all(isinstance(c, str) for c in captions):
            raise UsageError(f"{where} needs a 'caption': a string or a list of strings")
        item_id = str(entry.get("image_id", entry["image"]))
        if item_id in pairs:
            raise UsageError(f"{where}: id {item_id!r} appears twice; ids must be unique")
        pairs[item_id] = (entry["image"], captions)
    return pairs


def _load_shards(spec: str) -> TaskData:
    shards = find_shards(spec)
    return TaskData(
        _shard_items(shards), None, fingerprint(Path(spec.split("{")[0] or "."), [], shards, None)
    )


def _shard_items(shards: list[str]) -> Iterator[EvalItem]:
    """Stream the samples (webdataset, like describe): only the batch in flight is held in memory."""
    import webdataset as wds

    seen: set[str] = set()
    for shard in shards:
        try:
            for sample in wds.WebDataset([shard], shardshuffle=False, empty_check=False):
                key = str(sample.get("__key__"))
                check_unique(key, seen, shard)
                data = next((sample[ext] for ext in IMAGE_EXTENSIONS if ext in sample), None)
                caption = _shard_caption(sample)
                if caption is None:
                    raise UsageError(f"{shard}: sample {key} has neither a .txt caption nor a json caption")
                name = f"{shard}#{key}"
                if data is None:
                    yield EvalItem(
                        key, name, [caption], error=f"no image member ({'/'.join(IMAGE_EXTENSIONS)})"
                    )
                else:
                    yield EvalItem(
                        key, name, [caption], open=lambda data=data, name=name: open_image(data, name)
                    )
        except UsageError:
            raise
        except Exception as exc:  # noqa: BLE001 - tarfile/webdataset raise many types
            raise UsageError(f"{shard}: cannot read the shard ({str(exc).splitlines()[0]})") from exc


def _shard_caption(sample: dict[str, Any]) -> str | None:
    if "txt" in sample:
        return sample["txt"].decode("utf-8", "replace").strip()
    if "json" in sample:
        try:
            caption = json.loads(sample["json"]).get("caption")
        except (ValueError, AttributeError):
            return None
        return caption if isinstance(caption, str) else None
    return None


def score(records: list[dict[str, Any]], cfg: EvalConfig) -> TaskScores:
    answers = {r["id"]: r["answer"] for r in records}
    references = {r["id"]: list(r["reference"]) for r in records}
    result = score_captions(answers, references, meteor=cfg.meteor)
    metrics = {**result.corpus, "n": len(records)}
    return TaskScores(result.per_item, metrics, result.notes)


TASK = Task(name="captions", load=load, score=score, default_prompt=None, primary="cider_d")
