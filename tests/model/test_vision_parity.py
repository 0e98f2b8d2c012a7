"""Our timm-based vision tower computes what the official LAVIS EVA ViT computes on the same weights.

The reference below is written from the official module definition (OFFICIAL.md §1): pre-norm blocks,
qkv without bias plus q_bias / zero k bias / v_bias, exact GELU MLP, all tokens out, no final norm.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mgpt4.model.checkpoints import load_eva_vit
from mgpt4.model.presets import VisionSpec
from mgpt4.model.vision import build_ln_vision, build_vision_encoder

SPEC = VisionSpec(image_size=28, patch_size=14, width=32, depth=2, num_heads=4, mlp_dim=96)


def lavis_eva_state(spec: VisionSpec, blocks: int) -> dict[str, torch.Tensor]:
    """Random weights under the exact eva_vit_g.pth key names (scaled down)."""
    g = torch.Generator().manual_seed(7)
    w = spec.width

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.2

    state = {
        "cls_token": r(1, 1, w),
        "pos_embed": r(1, spec.num_patches + 1, w),
        "patch_embed.proj.weight": r(w, 3, spec.patch_size, spec.patch_size),
        "patch_embed.proj.bias": r(w),
    }
    for i in range(blocks):
        state |= {
            f"blocks.{i}.norm1.weight": 1 + r(w),
            f"blocks.{i}.norm1.bias": r(w),
            f"blocks.{i}.attn.qkv.weight": r(3 * w, w),
            f"blocks.{i}.attn.q_bias": r(w),
            f"blocks.{i}.attn.v_bias": r(w),
            f"blocks.{i}.attn.proj.weight": r(w, w),
            f"blocks.{i}.attn.proj.bias": r(w),
            f"blocks.{i}.norm2.weight": 1 + r(w),
            f"blocks.{i}.norm2.bias": r(w),
            f"blocks.{i}.mlp.fc1.weight": r(spec.mlp_dim, w),
            f"blocks.{i}.mlp.fc1.bias": r(spec.mlp_dim),
            f"blocks.{i}.mlp.fc2.weight": r(w, spec.mlp_dim),
            f"blocks.{i}.mlp.fc2.bias": r(w),
        }
    return state


def reference_eva(state: dict[str, torch.Tensor], spec: VisionSpec, images: torch.Tensor) -> torch.Tensor:
    x = F.conv2d(
        images, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], stride=spec.patch_size
    )
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([state["cls_token"].expand(len(x), -1, -1), x], dim=1) + state["pos_embed"]
    heads, dim = spec.num_heads, spec.width // spec.num_heads
    for i in range(spec.depth):
        p = {k[len(f"blocks.{i}.") :]: v for k, v in state.items() if k.startswith(f"blocks.{i}.")}
        h = F.layer_norm(x, (spec.width,), p["norm1.weight"], p["norm1.bias"], eps=1e-6)
        bias = torch.cat([p["attn.q_bias"], torch.zeros_like(p["attn.q_bias"]), p["attn.v_bias"]])
        q, k, v = (
            F.linear(h, p["attn.qkv.weight"], bias).reshape(len(x), -1, 3, heads, dim).permute(2, 0, 3, 1, 4)
        )
        attn = ((q * dim**-0.5) @ k.transpose(-2, -1)).softmax(-1)
        h = (attn @ v).transpose(1, 2).reshape(len(x), -1, spec.width)
        x = x + F.linear(h, p["attn.proj.weight"], p["attn.proj.bias"])
        h = F.layer_norm(x, (spec.width,), p["norm2.weight"], p["norm2.bias"], eps=1e-6)
        x = x + F.linear(
            F.gelu(F.linear(h, p["mlp.fc1.weight"], p["mlp.fc1.bias"])),
            p["mlp.fc2.weight"],
            p["mlp.fc2.bias"],
        )
    return x  # all tokens, no final norm


class _Holder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.visual_encoder = build_vision_encoder(SPEC)


def test_eva_matches_official_definition_and_ignores_extra_block(tmp_path):
    state = lavis_eva_state(SPEC, blocks=SPEC.depth + 1)  # like EVA-CLIP-g: one block more than used
    path = tmp_path / "eva_vit_g.pth"
    torch.save(state, path)
    holder = _Holder()
    load_eva_vit(holder, path)
    for key, value in holder.visual_encoder.state_dict().items():
        torch.testing.assert_close(value, state[key], msg=f"{key} did not arrive")
    images = torch.randn(2, 3, SPEC.image_size, SPEC.image_size)
    ours = holder.visual_encoder.forward_features(images)
    assert ours.shape == (2, SPEC.num_patches + 1, SPEC.width)
    torch.testing.assert_close(ours, reference_eva(state, SPEC, images), atol=1e-5, rtol=1e-5)


def test_ln_vision_uses_official_eps():
    assert build_ln_vision(32).eps == 1e-5
