"""Pretrain the micro ViT on shapes images without captions: heads name what each patch shows.

Supervision comes from the pixels and the scene's attributes, never from caption text: each patch
(8×8 pixels) is labelled with the colour, shape and grid position of the object covering at least
``COVERED`` of it (or "none"), and the mean patch feature with the number of objects. The heads are
linear, so the features they leave behind are linearly readable, which is what a projection-only
stage 1 needs. The heads are thrown away; only ``visual_encoder`` weights are kept.
"""

from __future__ import annotations

import dataclasses
import io
import math
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from torch import nn

from mgpt4.config import field
from mgpt4.data import synthetic
from mgpt4.model.presets import Preset, VisionSpec
from mgpt4.model.vision import build_ln_vision, build_vision_encoder, image_transform

COVERED = 0.3  # fraction of a patch's pixels an object must cover for the patch to be labelled with it
INK = 60  # summed |RGB - background| above which a pixel belongs to a shape (the data set's own test)
DATA_SEED = 1000  # shapes seed offset of the pretraining images: never the demo's data (seed 0)
JPEG_QUALITY = 95  # the demo's download stores JPEGs at img2dataset's default quality


@dataclasses.dataclass
class VisionPretrainConfig:
    """Settings of the micro ViT pretraining."""

    images: int = field(16000, doc="distinct training images (a fixed pool, drawn with horizontal flips)")
    # Measured (held-out, tokens an object covers): shape 0.96, colour 0.98, position 0.98 after 2000
    # steps; per-patch heads alone reached shape 0.66 per patch and 0.80 in stage-1 captions.
    steps: int = field(2000, doc="optimizer steps")
    batch_size: int = field(64, doc="images per step")
    lr: float = field(1e-3, doc="peak AdamW learning rate (linear warmup, cosine to zero)")
    warmup_steps: int = field(50, doc="linear warmup steps")
    weight_decay: float = field(0.05, doc="AdamW weight decay")
    seed: int = field(
        0, doc="seed of the initialisation, the draw order and the pool (shapes seed 1000+seed)"
    )


# Class ids: 0 = no object on the patch.
COLOUR_IDS = {name: i + 1 for i, name in enumerate(synthetic.COLOURS)}
SHAPE_IDS = {name: i + 1 for i, name in enumerate(synthetic.SHAPES)}
POSITION_IDS = {name: i + 1 for i, name in enumerate(synthetic.POSITIONS)}
_PAIR_CENTRES = {name: (x, y) for layout in synthetic.PAIR_LAYOUTS for name, x, y in layout}
# A horizontal flip is another valid scene (every shape is mirror-symmetric): left and right swap.
_MIRROR_WORD = {"left": "right", "right": "left"}
MIRRORED_POSITION = torch.tensor(
    [0] + [POSITION_IDS[" ".join(_MIRROR_WORD.get(w, w) for w in p.split())] for p in synthetic.POSITIONS]
)


def token_labels(image: Image.Image, attributes: dict, patch_size: int, merge: int) -> torch.Tensor:
    """Per image token (colour, shape, position) class ids, read off the pixels: (3, T), 0 = background.

    A token is ``merge`` consecutive patches of a row (the tokens ``llama_proj`` reads; 1 = single
    patches). Shape pixels are those far from the background level (the image corners, which no shape
    reaches); in a two-shape image each pixel belongs to the shape whose layout slot is nearer.
    """
    pixels = np.asarray(image, dtype=np.int32)  # (H, W, 3)
    side = pixels.shape[0]
    corners = np.stack([pixels[0, 0], pixels[0, -1], pixels[-1, 0], pixels[-1, -1]])
    ink = np.abs(pixels - np.median(corners, axis=0)).sum(axis=-1) > INK  # (H, W)
    shapes = attributes["shapes"]
    owner = np.zeros((side, side), dtype=np.int64)
    if len(shapes) > 1:
        ys, xs = np.mgrid[0:side, 0:side] / side
        distances = [(xs - _PAIR_CENTRES[s["position"]][0]) ** 2 + (ys - _PAIR_CENTRES[s["position"]][1]) ** 2
                     for s in shapes]  # fmt: skip
        owner = np.argmin(np.stack(distances), axis=0)
    rows, columns = side // patch_size, side // (patch_size * merge)
    labels = torch.zeros(3, rows * columns, dtype=torch.long)
    for index, shape in enumerate(shapes):
        mask = (ink & (owner == index)).reshape(rows, patch_size, columns, patch_size * merge)
        covered = torch.from_numpy(mask.mean(axis=(1, 3)).reshape(-1) >= COVERED)  # (T,)
        labels[0, covered] = COLOUR_IDS[shape["colour"]]
        labels[1, covered] = SHAPE_IDS[shape["shape"]]
        labels[2, covered] = POSITION_IDS[shape["position"]]
    return labels


class _ImagePool:
    """The pretraining images, made on first use (a step needs only its own), kept as JPEG-decoded RGB."""

    def __init__(self, cfg: VisionPretrainConfig, spec: VisionSpec, merge: int) -> None:
        self.cfg, self.spec, self.merge = cfg, spec, merge
        self.transform = image_transform(spec.image_size)
        self.items: dict[int, tuple[Image.Image, dict[str, torch.Tensor], int]] = {}

    def get(self, index: int) -> tuple[Image.Image, dict[str, torch.Tensor], int]:
        if index not in self.items:
            sample = synthetic.make_sample(index, DATA_SEED + self.cfg.seed, "train", self.spec.image_size)
            encoded = io.BytesIO()
            sample.image.save(encoded, "JPEG", quality=JPEG_QUALITY)
            image = Image.open(io.BytesIO(encoded.getvalue())).convert("RGB")
            labels = {
                level: token_labels(sample.image, sample.attributes, self.spec.patch_size, merge)
                for level, merge in (("patch", 1), ("token", self.merge))
            }
            self.items[index] = (image, labels, sample.attributes["count"])
        return self.items[index]

    def batch(
        self, indices: list[int], flips: list[bool]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """Images (B, 3, S, S), labels ``patch`` (B, 3, P) and ``token`` (B, 3, T), counts - 1 (B,)."""
        rows = self.spec.image_size // self.spec.patch_size
        images, labels, counts = [], {"patch": [], "token": []}, []
        for index, flip in zip(indices, flips, strict=True):
            image, classes, count = self.get(index)
            if flip:
                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
                classes = {level: _mirror(ids, rows) for level, ids in classes.items()}
            images.append(self.transform(image))
            for level, ids in classes.items():
                labels[level].append(ids)
            counts.append(count - 1)
        stacked = {level: torch.stack(ids) for level, ids in labels.items()}
        return torch.stack(images), stacked, torch.tensor(counts)


def _mirror(ids: torch.Tensor, rows: int) -> torch.Tensor:
    """Labels (3, N) of the horizontally flipped image: columns reversed, left and right swapped."""
    ids = ids.reshape(3, rows, -1).flip(-1).reshape(3, -1)
    return torch.stack([ids[0], ids[1], MIRRORED_POSITION[ids[2]]])


class _Heads(nn.Module):
    """Linear heads on the ``ln_vision`` features: colour/shape/position per patch and per image token
    (``merge`` patches, what ``llama_proj`` reads), the object count from the mean patch."""

    def __init__(self, width: int, merge: int) -> None:
        super().__init__()
        self.merge = merge
        classes = {"colour": len(COLOUR_IDS), "shape": len(SHAPE_IDS), "position": len(POSITION_IDS)}
        classes = {name: count + 1 for name, count in classes.items()}  # + "no object"
        self.patch = nn.ModuleDict({name: nn.Linear(width, n) for name, n in classes.items()})
        self.token = nn.ModuleDict({name: nn.Linear(width * merge, n) for name, n in classes.items()})
        self.count = nn.Linear(width, 2)

    def logits(self, patches: torch.Tensor) -> dict[str, torch.Tensor]:
        """patches (B, P, W) → ``patch_*`` (B, P, classes), ``token_*`` (B, T, classes), ``count`` (B, 2)."""
        batch, count, width = patches.shape
        tokens = patches.reshape(batch, count // self.merge, width * self.merge)  # (B, T, m·W) as in MiniGPT4
        out = {f"patch_{name}": head(patches) for name, head in self.patch.items()}
        out.update({f"token_{name}": head(tokens) for name, head in self.token.items()})
        out["count"] = self.count(patches.mean(dim=1))
        return out

    def loss(
        self, patches: torch.Tensor, labels: dict[str, torch.Tensor], counts: torch.Tensor
    ) -> torch.Tensor:
        """Summed cross-entropy of every head; ``labels``: ``patch`` (B, 3, P) and ``token`` (B, 3, T)."""
        logits = self.logits(patches)
        total = nn.functional.cross_entropy(logits["count"], counts)
        for level in ("patch", "token"):
            for row, name in enumerate(("colour", "shape", "position")):
                predicted = logits[f"{level}_{name}"].flatten(0, 1)
                total = total + nn.functional.cross_entropy(predicted, labels[level][:, row].flatten())
        return total


class VisionPretraining(nn.Module):
    """The ViT, its (frozen, identity) ``ln_vision`` and the heads."""

    def __init__(self, preset: Preset) -> None:
        super().__init__()
        self.encoder = build_vision_encoder(preset.vision)
        # Left at its identity init, as in the official Llama-2 MiniGPT-4 (see the package doc).
        self.ln_vision = build_ln_vision(preset.vision.width).requires_grad_(False)
        self.heads = _Heads(preset.vision.width, preset.merge_patches)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, S, S) → patch features (B, P, W) as MiniGPT-4 reads them (CLS dropped)."""
        return self.ln_vision(self.encoder.forward_features(images))[:, 1:]


def pretrain_vision(
    cfg: VisionPretrainConfig,
    preset: Preset,
    on_step: Callable[[int, nn.Module, float], None] | None = None,
    stop_after: int | None = None,
) -> dict[str, torch.Tensor]:
    """Train a micro EVA ViT of ``spec`` with the heads above; returns its ``visual_encoder`` weights.

    Args:
        cfg: sizes and optimiser settings.
        preset: the model shape (its ViT, and how many patches make one image token).
        on_step: called after every step with (steps done, the `VisionPretraining` module, loss).
        stop_after: stop after this many steps (the schedule still spans ``cfg.steps``).
    """
    torch.manual_seed(cfg.seed)
    model = VisionPretraining(preset)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    pool = _ImagePool(cfg, preset.vision, preset.merge_patches)
    permutations: dict[int, torch.Tensor] = {}
    for step in range(min(cfg.steps, stop_after or cfg.steps)):
        for group in optimizer.param_groups:
            group["lr"] = _cosine(cfg.lr, cfg.warmup_steps, cfg.steps, step)
        indices, flips = _draw(cfg, step, permutations)
        images, labels, counts = pool.batch(indices, flips)
        loss = model.heads.loss(model(images), labels, counts)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if on_step is not None:
            on_step(step + 1, model, loss.item())
    return {name: tensor.detach().clone() for name, tensor in model.encoder.state_dict().items()}


def _draw(
    cfg: VisionPretrainConfig, step: int, permutations: dict[int, torch.Tensor]
) -> tuple[list[int], list[bool]]:
    """Pool indices and flips of one step: epochs are seeded permutations of the pool."""
    indices = []
    for position in range(step * cfg.batch_size, (step + 1) * cfg.batch_size):
        epoch, offset = divmod(position, cfg.images)
        if epoch not in permutations:
            generator = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
            permutations[epoch] = torch.randperm(cfg.images, generator=generator)
        indices.append(int(permutations[epoch][offset]))
    flips = torch.rand(cfg.batch_size, generator=torch.Generator().manual_seed(cfg.seed * 100_003 + step))
    return indices, (flips < 0.5).tolist()


def _cosine(peak: float, warmup: int, total: int, step: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return 0.5 * peak * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
