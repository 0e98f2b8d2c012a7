"""Named model sizes. Every official number lives here once, with its source.

Sources (see shared/OFFICIAL.md): MG = Vision-CAIR/MiniGPT-4 (``eva_vit.py``, ``minigpt4.py``,
``minigpt4_llama2.yaml``), LAVIS ``blip2.py``; LLM shapes from the released HF ``config.json`` files.
"""

from __future__ import annotations

import dataclasses
import difflib

from mgpt4.errors import UsageError


@dataclasses.dataclass(frozen=True)
class VisionSpec:
    """EVA ViT (timm ``Eva``) dimensions."""

    image_size: int
    patch_size: int
    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    layer_norm_eps: float = 1e-6  # MG eva_vit.py: partial(nn.LayerNorm, eps=1e-6)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclasses.dataclass(frozen=True)
class QFormerSpec:
    """BLIP-2 Q-Former (transformers ``Blip2QFormerModel``) dimensions."""

    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    num_query_tokens: int
    cross_attention_frequency: int = 2  # LAVIS blip2.py: cross-attention in every 2nd layer
    layer_norm_eps: float = 1e-12  # bert-base-uncased config


@dataclasses.dataclass(frozen=True)
class LLMSpec:
    """Llama-family decoder dimensions, used to build a random LLM (or on the meta device)."""

    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    rms_norm_eps: float
    num_kv_heads: int | None = None


@dataclasses.dataclass(frozen=True)
class Preset:
    """A complete MiniGPT-4 shape plus the prompt conventions its LLM was trained with."""

    name: str
    description: str
    vision: VisionSpec
    qformer: QFormerSpec | None
    llm: LLMSpec
    # Llama-2 MiniGPT-4 has no Q-Former: CLS is dropped and every 4 consecutive patch tokens are
    # concatenated (256 → 64 tokens of 4·1408 = 5632), MG minigpt4.py encode_img.
    merge_patches: int = 1
    stage2_template: str = "###Human: {} ###Assistant: "  # MG minigpt4_stage2_finetune.yaml
    stage2_end_sym: str = "###"
    chat_style: str = "vicuna0"  # MG conversation.py CONV_VISION_Vicuna0
    # Micro presets have no released LLM: the LLM is random and sized to the small built tokenizer.
    from_scratch: bool = False

    @property
    def llm_input_width(self) -> int:
        """Width of the tokens ``llama_proj`` reads: Q-Former hidden, or merged ViT patches."""
        if self.qformer is not None:
            return self.qformer.hidden_size
        return self.vision.width * self.merge_patches

    @property
    def num_image_tokens(self) -> int:
        """How many LLM positions one image occupies."""
        if self.qformer is not None:
            return self.qformer.num_query_tokens
        return self.vision.num_patches // self.merge_patches


EVA_VIT_G = VisionSpec(
    image_size=224,  # MG minigpt4.yaml image_size
    patch_size=14,
    width=1408,
    depth=39,  # EVA ViT-g has 40 blocks; BLIP-2/MiniGPT-4 build 39 (penultimate layer features)
    num_heads=16,  # 1408 // 88
    mlp_dim=6144,  # int(1408 * 4.3637)
)

BLIP2_QFORMER = QFormerSpec(
    hidden_size=768,  # bert-base-uncased
    num_layers=12,
    num_heads=12,
    intermediate_size=3072,
    num_query_tokens=32,  # MG minigpt4.yaml num_query_token
)

# Vicuna v0 / Llama-1 configs use rms_norm_eps 1e-6; Llama-2 uses 1e-5 and a 4096 context.
LLAMA_7B = LLMSpec(4096, 32, 32, 11008, 32000, 2048, 1e-6)
LLAMA_13B = LLMSpec(5120, 40, 40, 13824, 32000, 2048, 1e-6)
LLAMA2_7B = LLMSpec(4096, 32, 32, 11008, 32000, 4096, 1e-5)

MICRO_VISION = VisionSpec(image_size=64, patch_size=8, width=96, depth=3, num_heads=4, mlp_dim=256)
MICRO_LLM = LLMSpec(128, 2, 4, 352, 1024, 512, 1e-6)  # vocab: at most; the built tokenizer decides

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            name="micro",
            description="a few million parameters with a Q-Former; trains from scratch on 2 CPU cores",
            vision=MICRO_VISION,
            qformer=QFormerSpec(
                hidden_size=96, num_layers=2, num_heads=4, intermediate_size=256, num_query_tokens=8
            ),
            llm=MICRO_LLM,
            from_scratch=True,
        ),
        Preset(
            name="micro-patches",
            description="micro without a Q-Former (merged ViT patches, like the Llama-2 MiniGPT-4); "
            "learns the demo's shapes fastest",
            vision=MICRO_VISION,
            qformer=None,
            llm=MICRO_LLM,
            merge_patches=4,
            from_scratch=True,
        ),
        Preset(
            name="vicuna-7b",
            description="official MiniGPT-4 (Vicuna v0 7B): EVA ViT-g + Q-Former + Linear(768→4096)",
            vision=EVA_VIT_G,
            qformer=BLIP2_QFORMER,
            llm=LLAMA_7B,
        ),
        Preset(
            name="vicuna-13b",
            description="official MiniGPT-4 (Vicuna v0 13B): EVA ViT-g + Q-Former + Linear(768→5120)",
            vision=EVA_VIT_G,
            qformer=BLIP2_QFORMER,
            llm=LLAMA_13B,
        ),
        Preset(
            name="llama2-7b",
            description="official MiniGPT-4 (Llama-2-7b-chat): EVA ViT-g, no Q-Former, Linear(5632→4096)",
            vision=EVA_VIT_G,
            qformer=None,
            llm=LLAMA2_7B,
            merge_patches=4,
            stage2_template="[INST] {} [/INST] ",  # MG minigpt4_llama2_stage2_finetune.yaml
            stage2_end_sym="</s>",
            chat_style="llama2",
        ),
    )
}


def get_preset(name: str) -> Preset:
    """Look up a preset by name.

    Raises:
        UsageError: unknown name (lists the valid ones and the nearest).
    """
    if name in PRESETS:
        return PRESETS[name]
    close = difflib.get_close_matches(name, list(PRESETS), n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise UsageError(f"unknown model preset '{name}': {hint}choose one of {', '.join(PRESETS)}")
