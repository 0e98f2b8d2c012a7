"""Vision tower: EVA ViT (timm ``Eva``), the ``ln_vision`` LayerNorm, and the image transform.

timm's ``Eva`` already uses the LAVIS key names (``blocks.i.attn.qkv.weight``, ``q_bias``, ``v_bias``,
``mlp.fc1`` …), so official ``eva_vit_g.pth`` files load without renaming.
"""

from __future__ import annotations

import functools

from timm.models.eva import Eva
from torch import nn
from torchvision import transforms

from mgpt4.model.presets import VisionSpec

# CLIP normalisation, MG blip_processors.py (train == eval).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def build_vision_encoder(spec: VisionSpec) -> Eva:
    """EVA ViT returning all ``1 + num_patches`` tokens after the last block, with no final norm.

    MG eva_vit.py comments out the final norm/head, so the official features are the raw block-38
    output; ``use_post_transformer_norm=False`` gives exactly that and leaves no ``norm.*`` keys.
    """
    return Eva(
        img_size=spec.image_size,
        patch_size=spec.patch_size,
        num_classes=0,
        global_pool="",
        embed_dim=spec.width,
        depth=spec.depth,
        num_heads=spec.num_heads,
        mlp_ratio=spec.mlp_dim / spec.width,
        qkv_bias=True,
        qkv_fused=True,
        use_abs_pos_emb=True,
        use_rot_pos_emb=False,
        use_post_transformer_norm=False,
        use_fc_norm=False,
        norm_layer=functools.partial(_layer_norm, eps=spec.layer_norm_eps),
    )


def _layer_norm(dim: int, eps: float, **factory_kwargs) -> nn.LayerNorm:
    # timm passes device/dtype through to norm layers, so accept them.
    return nn.LayerNorm(dim, eps=eps, **factory_kwargs)


def build_ln_vision(width: int) -> nn.LayerNorm:
    """The LayerNorm between ViT and Q-Former. Official eps is torch's default 1e-5 (HF uses 1e-6)."""
    return nn.LayerNorm(width, eps=1e-5)


def image_transform(image_size: int) -> transforms.Compose:
    """PIL image → normalised tensor: squash-resize (bicubic, no crop) → CLIP mean/std."""
    return transforms.Compose(
        [
            # convert() copies even an RGB image: at the decode cap that copy alone is ~256 MiB.
            transforms.Lambda(lambda img: img if img.mode == "RGB" else img.convert("RGB")),
            transforms.Resize((image_size, image_size), interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.ToTensor(),
            transforms.Normalize(CLIP_MEAN, CLIP_STD),
        ]
    )
